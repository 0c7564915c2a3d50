"""HPSv2 worker (environment: envs/hpsv2.yaml; client: drpo.rewards.worker.HPSv2Worker).

HPSv2.0 = open_clip ViT-H-14 built from the local laion2B-s32B-b79K weights, then HPS_v2_compressed.pt loaded
over it. Score = cosine similarity of the normalised image and text embeddings (no logit scale), computed under
autocast as the hpsv2 package does. The hpsv2 package itself is not used: it downloads at init and its wheel lacks
the tokenizer vocabulary (HPSv2 issues #16, #30); open_clip ships the same architecture and tokenizer.
"""

import argparse
import os

from protocol import serve


def load(args):
    os.environ["HF_HUB_OFFLINE"] = "1"
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-H-14", pretrained=args.clip_checkpoint, precision="amp", device=args.device
    )
    state = torch.load(args.checkpoint, map_location="cpu")["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"{args.checkpoint} lacks {len(missing)} tensors of ViT-H-14, e.g. {missing[:5]}")
    if unexpected:
        print(f"hpsv2_worker: ignoring {len(unexpected)} checkpoint keys, e.g. {unexpected[:5]}", flush=True)
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
