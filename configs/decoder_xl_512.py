# The 512 px upsampling decoder (paper §6.1): the same 16 x 16 DINOv2-B tokens as at 256 px (the encoder sees
# 224 px), decoded with patch p_d = 32 to 512 x 512. A diffusion model trained on 256 px latents then samples 512 px
# images at the cost of 256 px (paper Table 9: rFID 0.97, gFID 1.61, against 0.53 / 1.13 with 1024 tokens). The
# released ViTXL_n08_i512 decoder is the other option: 448 px encoder input, 32 x 32 tokens, p_d = 16. The
# discriminator still looks at 224 px (it resizes every input to its backbone's 224).
#
#   python fid.py --write-ref val512.npz /data/imagenet/val --image-size 512            # rFID statistics, once
#   torchrun --standalone --nproc_per_node=8 decoder_train.py configs/decoder_xl_512.py \
#       --data_path=/data/imagenet/train --val_path=/data/imagenet/val --rfid_reference=val512.npz
#
# 512 a step = 64 per GPU on 8 GPUs (LPIPS at 512 px needs ~4x the activation memory of 256 px: if a GPU runs
# out, use 16 GPUs, 32 each); 2502 steps per epoch, 40,032 steps in 16 epochs, phases as decoder_xl.py.
out_dir = 'runs/decoder-xl-512'
encoder = 'dinov2-b'
decoder_size = 'XL'                 # 418M parameters: the output layer is 1152 -> 32 * 32 * 3
image_size = 512                    # random 512 crops of a 768 px short-side resize
decoder_patch = 32                  # 512 / 32 = 16 x 16 tokens: the encoder sees 16 * 14 = 224 px
eval_every = 2502                   # every epoch
