"""Layer 4: learned registration. Networks, model files (safetensors + JSON card, torch-free) and the registry (torch-free), synthetic pairs, datasets, training."""
