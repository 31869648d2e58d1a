"""The beta-VAE over multi-hot tag sets: the model, set sizes, latent-space regularisation (LSR), and
the `vae train`, `vae sample` and `vae explain` stages."""
