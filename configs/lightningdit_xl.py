# LightningDiT-XL ("DiT-XL" in the paper) on DINOv2-B RAE latents at 256 px: the §4 baseline (Table 6: gFID 4.28 at 80
# epochs with the noise-augmented decoder). Width 1152 >= the 768-d tokens, as Theorem 1 requires.
#   torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/lightningdit_xl.py \
#       --data_path=/data/imagenet/train
# The defaults of diffusion_train.py (configs/xl.py) with LightningDiT's own recipe (App. F): constant lr 2e-4 and
# EMA 0.9999. 677M parameters.
# Batch 1024 = 128 per GPU x 8 GPUs -> 1251 steps/epoch; 80 epochs = 100,080 steps.
out_dir = 'runs/lightningdit_xl'
model = 'LightningDiT-XL'
epochs = 80
lr_final = 2e-4                  # constant
ema_decay = 0.9999
