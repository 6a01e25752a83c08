# DiT^DH-XL on DINOv2-B RAE latents at 256 px: the paper's main model (§5, App. F; Table 7: gFID 1.53 unguided at 800
# epochs, 2.16 at 80, 1.18 with AutoGuidance).
#   torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/xl.py --data_path=/data/imagenet/train
# Batch: 1024 global = 128 per GPU x 8 GPUs. ImageNet-1k train, 1,281,167 images: 160,145 per rank -> 1251 steps per
# epoch (the last 17 images of each rank's share are left out of that epoch). 800 epochs = 1,000,800 steps; the
# paper's 80-epoch numbers are this run at step 100,080 (same run, maintainer in bytetriper/RAE#45).
# lr: 2e-4 constant for 40 epochs (50,040 steps), then linear to 2e-5 at epoch 800.
# Latents [768, 16, 16] (DINOv2-B sees 224 px: 16 x 16 tokens of 768); alpha = sqrt(768 * 256 / 4096) = sqrt(48) = 6.93.
# FLOPs: 0.968 TFLOP per image per training step, forward + backward (bench/bench_train.py --model DiTDH-XL).
# Faster epochs: --mode=cache --latent_cache=/ssd/xl first (1.0 TB in float16), then add --latent_cache=/ssd/xl.
out_dir = 'runs/xl'
data_path = 'data/imagenet/train'
encoder = 'dinov2-b'
image_size = 256
stats = None                     # the released DINOv2-B statistics (variance only); or runs/xl/stat.pt (--mode=stats)
decoder = None                   # the released ViT-XL decoder (noise-augmented, tau = 0.8), for previews only

model = 'DiTDH-XL'               # 839M: backbone 1152 wide x 28 blocks, head 2048 wide x 2 blocks
num_classes = 1000
class_dropout = 0.1
time_dist = 'logit-normal'       # the released configs (the paper's runs drew uniform t; slightly worse gFID)
shift = None                     # sqrt(48)

global_batch = 1024
grad_accum = 1
epochs = 800
lr = 2e-4
lr_final = 2e-5
lr_decay_start = 40
lr_decay_end = 800
betas = (0.9, 0.95)
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.9995               # 0.9999 made the EMA converge slowly early on (App. F)

precision = 'auto'               # bf16 autocast on GPUs with bf16 (A100, H100, ...), else fp32; the authors
                                 # recommend fp32 for stability; bf16 has twice TF32's matmul peak on those
compile = True
global_seed = 0
workers = 8                      # 3 per GPU keep up with 45% MFU from JPEGs, 1 from the cache (bench/bench_data.py)
log_every = 100
sample_every = 10000
ckpt_every = 5000                # ~4 epochs; keep the last 3
fid_every = 0                    # e.g. 25000 with fid_samples = 10000 (a monitor, ~2 min on 8 H100s)
