"""nucleiseg: joint nuclei segmentation and fine-grained classification in H&E histopathology."""

__version__ = "0.1.0"
