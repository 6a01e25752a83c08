# DiT^DH-XL on DINOv2-B RAE latents at 512 px (Table 8: gFID 1.13 with AutoGuidance after 400 epochs).
#   torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/xl_512.py --data_path=/data/imagenet/train
# DINOv2-B sees 448 px: latents [768, 32, 32], 1024 tokens; alpha = sqrt(768 * 1024 / 4096) = sqrt(192) = 13.86.
# (The authors' published 512 training config still says 16 x 16 latents and has no lr schedule block.)
# Batch 1024 = 64 per GPU per micro-batch x 2 accumulation steps x 8 GPUs (4x the tokens of 256 px: halve the
# micro-batch; --grad_accum=1 where memory allows, the numbers do not change) -> 1251 steps/epoch;
# 400 epochs = 500,400 steps. Everything else as configs/xl.py (the defaults).
out_dir = 'runs/xl_512'
image_size = 512                 # the released 512 decoder (patch 16 on 32 x 32 tokens) and its statistics
grad_accum = 2
epochs = 400
fid_reference = 'imagenet512'   # ADM's 512 px reference batch, for --fid_every
