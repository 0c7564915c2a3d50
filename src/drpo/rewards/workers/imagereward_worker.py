"""ImageReward worker (environment: envs/imagereward.yaml; client: drpo.rewards.worker.ImageRewardWorker).

Loads THUDM's ImageReward v1.0 from local files only and answers with the package's normalised reward per image.
The package's BLIP always asks transformers for the `bert-base-uncased` tokenizer by hub name (ImageReward
issue #28); that one name is redirected to the local `--tokenizer` folder. The checkpoint must hold the model's
tensors (ImageReward's training code builds the same modules as the package, so its release holds exactly these).
"""

import argparse
import os

from protocol import serve
from weights import check_weights

# BLIP's contrastive projection heads: ImageReward's score never uses them, so a file without them scores the same.
UNUSED_BY_THE_SCORE = ("blip.vision_proj.*", "blip.text_proj.*")


def load(args):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from ImageReward.ImageReward import ImageReward
    from transformers import BertTokenizer

    hub_from_pretrained = BertTokenizer.from_pretrained

    def local_from_pretrained(name, *rest, **kwargs):
        return hub_from_pretrained(args.tokenizer if name == "bert-base-uncased" else name, *rest, **kwargs)

    BertTokenizer.from_pretrained = staticmethod(local_from_pretrained)
    # ImageReward.load's steps, with the strict=False load checked: it would accept a file of none of the tensors.
    model = ImageReward(med_config=args.med_config, device=args.device).to(args.device)
    state = torch.load(args.checkpoint, map_location="cpu")
    check_weights(args.checkpoint, *model.load_state_dict(state, strict=False), allow_missing=UNUSED_BY_THE_SCORE)
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
