# The stage-1 recipe of the released decoders: a ViT-XL decoder (415M parameters) on frozen DINOv2-B (with
# registers) tokens, 256 px, 16 epochs of ImageNet-1k (paper App. E.2). decoder_train.py's defaults are this
# recipe; the file spells it out.
#
#   python fid.py --write-ref val256.npz /data/imagenet/val --image-size 256           # rFID statistics, once
#   torchrun --standalone --nproc_per_node=8 decoder_train.py configs/decoder_xl.py \
#       --data_path=/data/imagenet/train --val_path=/data/imagenet/val --rfid_reference=val256.npz
#
# 512 images a step over 8 GPUs = 64 per GPU. ImageNet-1k train has 1,281,167 images: 160,145 per rank, 2502 steps
# per epoch (143 images left out each epoch), 16 epochs = 40,032 steps. Warm-up: steps 0-2501; the discriminator
# trains from step 15,012 (epoch 6), the GAN loss is on from step 20,016 (epoch 8); cosine to 2e-5 at step 40,032.
out_dir = 'runs/decoder-xl'
encoder = 'dinov2-b'                # 224 px input (16 x 16 tokens of 768) for 256 px images
decoder_size = 'XL'                 # 1152 wide, 28 blocks, 16 heads, MLP 4096
decoder_patch = 16                  # 16 x 16 tokens -> 256 px
image_size = 256                    # random 256 crops of a 384 px short-side resize, no flips
noise_tau = 0.8                     # the "n08" of the released decoder's name
perceptual_weight = 1.0
disc_weight = 0.75
disc_update_start_epoch = 6
disc_start_epoch = 8
global_batch = 512
epochs = 16
lr = 2e-4
lr_final = 2e-5
warmup_epochs = 1
lr_decay_end = 16
betas = (0.9, 0.95)
weight_decay = 0.0
ema_decay = 0.9978
precision = 'auto'                  # bf16 autocast on GPUs with bf16 (A100, H100, ...), else fp32
compile = True
eval_every = 2502                   # PSNR and rFID of the EMA decoder on ImageNet val (50k) every epoch
log_every = 100
