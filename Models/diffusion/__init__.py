"""Class-conditional Stable Diffusion in Keras 3.

presets.py      the sd1 / sd2 / tiny presets (widths, context, training and generation defaults)
layers.py       UNet and autoencoder blocks (keras-cv's weight order)
unet.py         timestep_embedding, build_unet
autoencoder.py  build_image_encoder, build_image_decoder (sd presets)
weights.py      keras-cv's published weight files: download, cache, load
"""
