"""HPSv2 worker (environment: envs/hpsv2.yaml; client: drpo.rewards.worker.HPSv2Worker).

HPSv2.0 = open_clip ViT-H-14 built from the local laion2B-s32B-b79K weights, then HPS_v2_compressed.pt loaded
over it; each file must hold exactly the model's tensors (no allow-list: HPSv2's own score.py loads its checkpoint
strictly). Score = cosine similarity of the normalised image and text embeddings (no logit scale), computed under
autocast as the hpsv2 package does. The hpsv2 package itself is not used: it downloads at init and its wheel lacks
the tokenizer vocabulary (HPSv2 issues #16, #30); open_clip ships the same architecture and tokenizer.
"""

import argparse
import os

from protocol import serve
from weights import check_weights


def load(args):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", precision="amp", device=args.device)
    # Both files must hold exactly ViT-H-14's tensors: open_clip's own loader, lenient, then our check.
    check_weights(args.clip_checkpoint, *open_clip.load_checkpoint(model, args.clip_checkpoint, strict=False))
    checkpoint = torch.load(args.checkpoint, map_location="cpu")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{args.checkpoint} has no 'state_dict' entry; expected HPS_v2_compressed.pt")
    check_weights(args.checkpoint, *model.load_state_dict(checkpoint["state_dict"], strict=False))
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def score(images, prompts, metadata):
        pixels = torch.stack([preprocess(image) for image in images]).to(args.device)
        with torch.autocast(device_type=torch.device(args.device).type, enabled=args.device != "cpu"):
            image = model.encode_image(pixels, normalize=True)
            text = model.encode_text(tokenizer(prompts).to(args.device), normalize=True)
        return (image.float() * text.float()).sum(dim=-1).tolist()

    return score


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clip-checkpoint", required=True, help="open_clip_pytorch_model.bin of ViT-H-14 laion2B")
    parser.add_argument("--checkpoint", required=True, help="HPS_v2_compressed.pt")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    serve(lambda: load(args), name="hpsv2", version="HPSv2.0 (HPS_v2_compressed.pt)")
