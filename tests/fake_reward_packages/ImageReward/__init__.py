"""Fake image-reward 1.5: the model class ImageReward.ImageReward.ImageReward."""
