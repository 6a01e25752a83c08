# DiT^DH-S on DINOv2-B RAE latents at 256 px (§5, Fig. 6: gFID 6.07 at 80 epochs). Its early checkpoints are the
# AutoGuidance guide of DiT^DH-XL (App. D; the released sampling config uses its epoch-14 weights, w = 1.42).
#   torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/s.py --data_path=/data/imagenet/train
# The defaults of diffusion_train.py are the recipe of configs/xl.py; only the size and length change here:
# the S backbone (384 wide x 12 blocks) with the same 2048-wide 2-block head, 197M parameters.
# Batch 1024 = 128 per GPU x 8 GPUs -> 1251 steps/epoch; 80 epochs = 100,080 steps (epoch 14 = step 17,514).
# lr 2e-4 for 40 epochs, then on its way to 2e-5 at epoch 800 (1.905e-4 at epoch 80), as the authors' S config.
out_dir = 'runs/s'
model = 'DiTDH-S'
epochs = 80
sample_every = 2500
