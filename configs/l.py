# DiT^DH-L on DINOv2-B RAE latents at 256 px (§5, Fig. 6).
#   torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/l.py --data_path=/data/imagenet/train
# The defaults of diffusion_train.py are the recipe of configs/xl.py; only the size and length change here:
# the L backbone (1024 wide x 24 blocks) with the same 2048-wide 2-block head, 622M parameters.
# Batch 1024 = 128 per GPU x 8 GPUs -> 1251 steps/epoch; 80 epochs = 100,080 steps.
out_dir = 'runs/l'
model = 'DiTDH-L'
epochs = 80
