from fake_tiny import TinyModel


class ImageReward(TinyModel):
    def __init__(self, med_config, device="cpu"):
        super().__init__()

    def score(self, prompt, image):
        return self.score_image(image)
