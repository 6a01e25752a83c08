# A tiny stage-1 run on a CPU: no network, no ImageNet, ~10 s. It exercises the whole pipeline (data, noise
# augmentation, L1 + LPIPS, the discriminator phase, the GAN phase with the adaptive weight, EMA, checkpoints and
# resume, PSNR evaluation, the reconstruct command), not image quality: all networks have random weights.
#
#   OMP_NUM_THREADS=1 python decoder_train.py configs/decoder_tiny.py
#   OMP_NUM_THREADS=1 python decoder_train.py configs/decoder_tiny.py --mode=reconstruct --image=photo.jpg  # recon.png
#
# (One thread: models this small gain nothing from a second, and on a busy machine it waits, ~10x slower.)
#
# toy=True writes, on first use, random-weight stand-ins for the weight files named below, in the published
# layouts (DINOv2 hub names, DINO v1 timm names, torchvision VGG16 + LPIPS heads), so the real loading code runs,
# and 2 x 32 synthetic images (48-71 px) into data_path.
toy = True
out_dir = 'runs/decoder-tiny'
data_path = 'runs/decoder-tiny/toy/images'
val_path = 'runs/decoder-tiny/toy/images'      # PSNR of the EMA decoder on the centre crops of the same images
encoder_weights = 'runs/decoder-tiny/toy/dinov2.pt'
encoder_overrides = dict(width=32, depth=2, heads=2, pos_grid=4)      # 4 x 4 tokens of 32 channels
disc_weights = 'runs/decoder-tiny/toy/dino_s8.pt'
disc_overrides = dict(width=32, depth=4, heads=2, pos_grid=4, input_size=32)  # 16 tokens instead of 784
disc_key_depths = (1, 3)
lpips_weights = ('runs/decoder-tiny/toy/vgg16.pt', 'runs/decoder-tiny/toy/lpips.pt')  # a narrow VGG16
image_size = 32                     # random 32 px crops of a 48 px short-side resize
decoder_patch = 8                   # 32 / 8 = 4 x 4 tokens; the encoder sees 4 x 14 = 56 px
decoder_arch = dict(width=64, depth=2, heads=1, mlp_hidden=128)  # stored in the checkpoints' config
# 64 images / 8 = 8 steps per epoch, 32 steps in all: the discriminator trains from step 8, the GAN loss from step 16
global_batch = 8
epochs = 4
disc_update_start_epoch = 1
disc_start_epoch = 2
lr = 1e-3                           # a tiny model takes a larger step than the recipe's 2e-4
lr_final = 1e-4
warmup_epochs = 1
lr_decay_end = 4
ema_decay = 0.9                     # averages the last ~10 of 32 steps (the recipe: 0.9978 over 40k steps)
log_every = 4
device = 'cpu'
precision = 'auto'                  # bf16 where the CPU has bf16 units (AVX512-BF16, AMX), else fp32
compile = False
workers = 0
