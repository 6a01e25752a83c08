# DiT^DH-B on DINOv2-B RAE latents at 256 px (§5, Fig. 6: gFID 3.38 at 80 epochs with ~40% of DiT-XL's FLOPs).
#   torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/b.py --data_path=/data/imagenet/train
# The defaults of diffusion_train.py are the recipe of configs/xl.py; only the size and length change here:
# the B backbone (768 wide x 12 blocks) with the same 2048-wide 2-block head, 294M parameters.
# Batch 1024 = 128 per GPU x 8 GPUs -> 1251 steps/epoch; 80 epochs = 100,080 steps.
out_dir = 'runs/b'
model = 'DiTDH-B'
epochs = 80
sample_every = 5000
