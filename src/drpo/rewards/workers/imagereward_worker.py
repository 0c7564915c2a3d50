"""ImageReward worker (environment: envs/imagereward.yaml; client: drpo.rewards.worker.ImageRewardWorker).

Loads THUDM's ImageReward v1.0 from local files only and answers with the package's normalised reward per image.
The package's BLIP always asks transformers for the `bert-base-uncased` tokenizer by hub name (ImageReward
issue #28); that one name is redirected to the local `--tokenizer` folder.
"""

import argparse
import os

from protocol import serve


def load(args):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import ImageReward
    import torch
    from transformers import BertTokenizer

    hub_from_pretrained = BertTokenizer.from_pretrained

    def local_from_pretrained(name, *rest, **kwargs):
        return hub_from_pretrained(args.tokenizer if name == "bert-base-uncased" else name, *rest, **kwargs)

    BertTokenizer.from_pretrained = staticmethod(local_from_pretrained)
    model = ImageReward.load(args.checkpoint, device=args.device, med_config=args.med_config)
    model.eval()

    @torch.no_grad()
    def score(images, prompts, metadata):
        return [float(model.score(prompt, image)) for image, prompt in zip(images, prompts)]

    return score


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="ImageReward.pt")
    parser.add_argument("--med-config", required=True, help="med_config.json of ImageReward")
    parser.add_argument("--tokenizer", required=True, help="local bert-base-uncased tokenizer folder")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    serve(lambda: load(args), name="imagereward", version="image-reward 1.5, ImageReward-v1.0")
