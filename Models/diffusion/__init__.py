"""Class-conditional Stable Diffusion in Keras 3.

presets.py      the sd1 / sd2 / tiny presets (widths, context, training and generation defaults)
layers.py       UNet and autoencoder blocks (keras-cv's weight order)
unet.py         timestep_embedding, build_unet
autoencoder.py  build_image_encoder, build_image_decoder (sd presets)
weights.py      keras-cv's published weight files: download, cache, load
backbone.py     ClassConditionalBackbone: class encoder + UNet (+ autoencoder), how each is called
generator.py    ClassConditionalGenerator: class labels -> uint8 images (DDIM, guidance, seeded noise)
trainer.py      DiffusionTrainer: fit with the diffusion loss, stages, the weight average; TrainBatches
optimizer.py    make_optimizer, learning_rate_schedule (cosine decay, optional warmup), PaperAdam (Keras' Adam: its scalars once per step, its state in flat vectors), AdamWithEMA, ema_optimizer, optimizer_state
checkpoints.py  stage checkpoints; build_model (a trainer), load_generation_model (a generator)
"""
