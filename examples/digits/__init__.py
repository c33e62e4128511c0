"""A small class-conditional DiT trained on scikit-learn's 8x8 digits (upscaled to 32x32), and a digit
classifier, shipped with their weights so PipeFusion's image quality can be measured on a real model."""
