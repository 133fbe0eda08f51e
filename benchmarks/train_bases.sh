#!/usr/bin/env bash
# The base models every benchmark starts from, with their exact schedules.
# Results (accuracy, epochs, wall time, machine) are in benchmarks/results/base/README.md;
# the files are committed in benchmarks/results/base/. Run from the project root.
set -euo pipefail
out=benchmarks/results/base

# LeNet-5 / MNIST: Adam 2e-3, weight decay 1e-4, batch 128, 10 epochs (99.30%, 97 s on 2 cores)
morphkit train lenet5 --data mnist:../shared/data/mnist --epochs 10 -o "$out/lenet5-mnist.safetensors"

# ResNet-20 / CIFAR-10, CPU schedule: SGD 0.1 (momentum, cosine), weight decay 5e-4, crop+flip, batch 128,
# 10 epochs (82.97%, 36 min on 1 thread of a shared machine). On a GPU use the recipe's 200 epochs
# (drop --epochs) for the >= 91% anchor.
OMP_NUM_THREADS=1 morphkit train resnet20 --data cifar10:../shared/data/cifar10-jpeg.tar.gz --epochs 10 \
    -o "$out/resnet20-cifar10.safetensors"

# The same with 24 epochs (86.70%, 84 min on 1 thread of a shared machine): only benchmarks/smoothing_tv.py uses it,
# to show how the total variation smoothing removes grows with training.
OMP_NUM_THREADS=1 morphkit train resnet20 --data cifar10:../shared/data/cifar10-jpeg.tar.gz --epochs 24 \
    -o "$out/resnet20-cifar10-24ep.safetensors"

# The same recipe for 50 epochs in bfloat16 (autocast + channels-last; ~95 s an epoch on 1 thread of this AMX CPU
# instead of ~210 s in float32): the best-trained ResNet-20 a CPU session here can make; smoothing_tv.py measures
# the TV target on it.
OMP_NUM_THREADS=1 morphkit train resnet20 --data cifar10:../shared/data/cifar10-jpeg.tar.gz --epochs 50 \
    --precision bf16 -o "$out/resnet20-cifar10-50ep.safetensors"

# MLP VAE / MNIST: the recipe (Adam 1e-3, no weight decay, 20 epochs); benchmarks/vae_mnist.py trains and
# writes it on its first run (MSE 6.98, NLL <= 95.58 nats, 52 s on 2 cores).
python benchmarks/vae_mnist.py --threads 2
