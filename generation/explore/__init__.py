"""`conceptcaps explore`: a static page (RUN/explorer/) to browse concepts and walk the VAE's latent space."""
