# A ViT-XL decoder on frozen SigLIP2-B/16 tokens (google/siglip2-base-patch16-256), the recipe of decoder_xl.py
# otherwise (one stage-1 recipe for every encoder). Paper Table 1a: rFID 0.53. SigLIP2 has no CLS token,
# normalises pixels with mean = std = 0.5 and sees 256 px directly: 16 x 16 tokens of 768.
#
#   torchrun --standalone --nproc_per_node=8 decoder_train.py configs/decoder_siglip2.py \
#       --data_path=/data/imagenet/train --val_path=/data/imagenet/val --rfid_reference=val256.npz
#
# 512 a step = 64 per GPU on 8 GPUs; 2502 steps per epoch, 40,032 steps in 16 epochs (as decoder_xl.py).
out_dir = 'runs/decoder-siglip2'
encoder = 'siglip2-b'
decoder_size = 'XL'
eval_every = 2502                   # every epoch
