# A ViT-B decoder (86M parameters) on frozen DINOv2-B tokens: the recipe of decoder_xl.py with the smallest
# decoder of the paper's decoder scaling (Table 1b: rFID 0.58 at 22.2 GFLOPs, against 0.49 at 106.7 for ViT-XL).
# A fifth of XL's decoder compute; the encoder, LPIPS and the discriminator cost the same.
#
#   torchrun --standalone --nproc_per_node=8 decoder_train.py configs/decoder_b.py \
#       --data_path=/data/imagenet/train --val_path=/data/imagenet/val --rfid_reference=val256.npz
#
# 512 a step = 64 per GPU on 8 GPUs; 2502 steps per epoch, 40,032 steps in 16 epochs (as decoder_xl.py).
out_dir = 'runs/decoder-b'
encoder = 'dinov2-b'
decoder_size = 'B'                  # 768 wide, 12 blocks, 12 heads, MLP 3072
eval_every = 2502                   # every epoch
