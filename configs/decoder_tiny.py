# A tiny stage-1 run on the CPU: no network, no ImageNet, about a minute on 2 cores. It checks the whole
# pipeline (data, noise augmentation, L1 + LPIPS, the discriminator phase and the GAN phase, EMA, checkpoints,
# resume, PSNR evaluation), not image quality: every network has small random weights.
#
#   python decoder_train.py configs/decoder_tiny.py
#   python decoder_train.py configs/decoder_tiny.py --reconstruct=photo.jpg    # crop | reconstruction -> recon.png
#
# make_tiny writes the stand-ins named below on first use, in the published layouts (DINOv2 hub names, DINO v1
# timm names, torchvision VGG16 + LPIPS heads), and 64 synthetic images (48-96 px) into data_dir.
make_tiny = True
out_dir = 'results/decoder-tiny'
data_dir = 'data/tiny/images'
val_dir = 'data/tiny/images'        # PSNR of the EMA decoder on the ADM centre crops of the training images
encoder = 'dinov2-b'
encoder_weights = 'data/tiny/dinov2_tiny.pt'
encoder_overrides = dict(width=32, depth=2, heads=2, pos_grid=4)       # 4 x 4 tokens of 32 channels
disc_weights = 'data/tiny/dino_s8_tiny.pt'
disc_overrides = dict(width=32, depth=4, heads=2, pos_grid=4, input_size=32)  # 16 tokens, not 784
disc_key_depths = (1, 3)
lpips_vgg_weights = 'data/tiny/vgg16_narrow.pt'
lpips_lin_weights = 'data/tiny/lpips_narrow.pt'
image_size = 32                     # random 32 px crops of a 48 px short-side resize
decoder_patch = 8                   # 32 / 8 = 4 x 4 tokens; the encoder sees 4 * 14 = 56 px
decoder_arch = dict(width=64, depth=2, heads=1, mlp_hidden=128)  # heads = width // 64: what from_state_dict infers
# 64 images / 8 = 8 steps per epoch, 32 steps in all; D trains from step 8, the GAN loss is on from step 16
global_batch = 8
epochs = 4
disc_update_start_epoch = 1
disc_start_epoch = 2
lr = 1e-3
final_lr = 1e-4
warmup_epochs = 1
decay_end_epoch = 4
log_every = 4
device = 'cpu'
precision = 'fp32'
compile = False
workers = 0
ema_decay = 0.9                     # an EMA over the last ~10 of 32 steps (the recipe: 0.9978 over 40k)
