"""fedit: federated fine-tuning and model editing of DINO ViT-S/16 on CIFAR-100, as a Flower app."""
