#!/bin/bash
# The image_weight trade-off at equal compute (paper Fig. 3, small scale), then raster vs random order.
# One core per run (OMP_NUM_THREADS=1); about 8 minutes a run on a 2-core CPU. Then: python docs/plot_sweep.py
cd "$(dirname "$0")/.."
mkdir -p out/sweep
[ -f out/vae/vae.pt ] || python vae.py --dataset shapes --out_dir out/vae     # the shapes VAE, once
for w in 1.0 0.0 0.9 0.5 0.995 0.75 0.33; do
  OMP_NUM_THREADS=1 python train.py --out_dir out/sweep/w$w --vae out/vae/vae.pt --image_weight $w \
    --max_steps 300 --tasks t2i=0.5,caption=0.25,vqa=0.25 --eval_n 20 --sample_interval 100000 --eval_interval 100000 > out/sweep/w$w.log 2>&1
done
OMP_NUM_THREADS=1 python train.py --out_dir out/sweep/raster0.9 --vae out/vae/vae.pt --image_weight 0.9 --order raster \
    --max_steps 300 --tasks t2i=0.5,caption=0.25,vqa=0.25 --eval_n 20 --sample_interval 100000 --eval_interval 100000 > out/sweep/raster0.9.log 2>&1
