"""The learning task, with no Flower import: what is trained, on what, and how.

data (datasets read once into device-resident uint8 splits), partition (the train/validation split and the
clients' shards), batches (index batches and the on-device transform), model (timm models and local weights),
head (the classifier and the step-0 heads), editing (step 0 and mask calibration on one split of data),
seeds (every random draw's key), train (training steps, evaluation, optimizers, schedules).
"""
