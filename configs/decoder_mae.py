# A ViT-XL decoder on frozen MAE-B/16 encoder tokens (facebook/vit-mae-base, no masking at inference), the released
# recipe otherwise (paper Table 1a: rFID 0.16, the best reconstruction and the worst diffusion latent).
# MAE's stored 14 x 14 position grid is interpolated to 16 x 16 for 256 px inputs.
#
#   torchrun --standalone --nproc_per_node=8 decoder_train.py configs/decoder_mae.py \
#       --data_path=/data/imagenet/train --val_path=/data/imagenet/val --rfid_reference=val256.npz
#
# 512 a step = 64 per GPU on 8 GPUs; 2502 steps per epoch, 40,032 steps in 16 epochs (as decoder_xl.py).
out_dir = 'runs/decoder-mae'
encoder = 'mae-b'
decoder_size = 'XL'
eval_every = 2502                   # every epoch
