"""The offline demo: a tiny text-to-image teacher trained here on the procedural dataset, and its builders.

`autoencoder` trains the demo's small KL autoencoder; `build_teacher` runs the whole recipe that produced the
committed teacher in `assets/demo/teacher` (autoencoder -> diffusion-trained UNet -> diffusers folder).
"""
