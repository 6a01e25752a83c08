# A tiny DiT^DH trained end to end on a CPU in a few minutes: toy images, a random-weight tiny RAE, no network.
#   python diffusion_train.py configs/tiny.py
# The first run writes runs/tiny/toy/ (toy=True, see make_toy in diffusion_train.py): 10 classes x 24 synthetic
# images of 32-47 px, a 2-block width-32 DINOv2-layout encoder saved in the hub layout (patch 4 on 32 px: latents
# [32, 8, 8]) and a 1-block decoder, both random. The real loading, encoding, training, preview and checkpoint code
# runs on them; the samples are meaningless (a random decoder), the falling loss is not.
# 16 images a step on 1 process: 240 images -> 15 steps/epoch; 30 epochs = 450 steps (~2-3 minutes on 2 cores).
# Latent statistics for it: python diffusion_train.py configs/tiny.py --mode=stats   (-> runs/tiny/stat.pt)
out_dir = 'runs/tiny'
toy = True
data_path = 'runs/tiny/toy/images'
encoder_weights = 'runs/tiny/toy/encoder.pt'
decoder = 'runs/tiny/toy/decoder.pt'
encoder_overrides = dict(width=32, depth=2, heads=2, patch=4, pos_grid=8, input_size=32)
stats = False                    # raw tokens (unit variance per token after the encoder's final LayerNorm)
image_size = 32

model = 'DiTDH'                  # a custom size: both widths >= the 32-d tokens (Theorem 1)
hidden_size = (64, 128)          # backbone, head
depth = (2, 1)
num_heads = (2, 2)
num_classes = 10

global_batch = 16
epochs = 30                      # 450 steps
lr = 1e-3                        # a tiny model takes a larger step than the paper's 2e-4
lr_final = 1e-4
lr_decay_start = 10
lr_decay_end = 30
ema_decay = 0.99                 # averages the last ~100 steps

device = 'cpu'
precision = 'auto'               # bf16 where the CPU has bf16 units (AVX512-BF16, AMX), else fp32
compile = False                  # compiling takes longer than this whole run
workers = 0
log_every = 25
sample_every = 150
sample_classes = (0, 1, 2, 3, 4, 5, 6, 7)
sample_steps = 25
ckpt_every = 150
