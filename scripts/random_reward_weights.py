"""Random weights of a reward model in the real files' formats, made with its environment's own packages.

Run by scripts/check_reward_envs.py with a worker environment's python (it imports that environment's packages,
never drpo). Writes, under OUT, the local files the worker reads at their real architecture and size, plus one
weights file of none of the model's tensors (in the same container) that the worker must refuse, then prints one
JSON line: {"files": {reward argument: path}, "broken": {reward argument: path}}.

    envs/.hpsv2/bin/python scripts/random_reward_weights.py hpsv2 /tmp/weights/hpsv2
"""

import json
import os
import string
import sys
from pathlib import Path

# BLIP's text encoder configuration (bert-base with cross-attention to ViT-L), the shape of ImageReward's
# med_config.json.
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; BLIP adds [DEC] and [ENC]


def hpsv2(out: Path) -> dict:
    import open_clip
    import torch

    model = open_clip.create_model("ViT-H-14")  # random initialisation, ViT-H-14's real shapes
    state = model.state_dict()
    clip = out / "open_clip_pytorch_model.bin"  # open_clip's laion2B file: the bare fp32 state dict
    torch.save(state, clip)
    hps = out / "HPS_v2_compressed.pt"  # HPSv2's release: {"state_dict": ...} in half precision
    torch.save({"state_dict": {key: value.half() for key, value in state.items()}}, hps)
    broken = out / "broken" / "HPS_v2_compressed.pt"
    broken.parent.mkdir(exist_ok=True)
    torch.save({"state_dict": {}}, broken)
    return {"files": {"clip_checkpoint": str(clip), "checkpoint_path": str(hps)},
            "broken": {"checkpoint_path": str(broken)}}


def bert_tokenizer_folder(folder: Path) -> None:
    """A bert-base-uncased-shaped tokenizer folder (the real special-token ids, a stand-in word list)."""
    from transformers import BertTokenizer

    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list(string.ascii_lowercase + string.digits + string.punctuation)
    words += [f"##{c}" for c in string.ascii_lowercase + string.digits]
    words += [f"[unused{i}]" for i in range(99, 99 + BERT_VOCAB_SIZE - len(words))]
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))


def imagereward(out: Path) -> dict:
    import torch
    from ImageReward.ImageReward import ImageReward
    from transformers import BertTokenizer

    tokenizer = out / "bert-base-uncased"
    bert_tokenizer_folder(tokenizer)
    med_config = out / "med_config.json"
    med_config.write_text(json.dumps(MED_CONFIG, indent=2))
    hub_from_pretrained = BertTokenizer.from_pretrained  # BLIP asks for bert-base-uncased by hub name
    BertTokenizer.from_pretrained = lambda name, *rest, **kw: hub_from_pretrained(str(tokenizer), *rest, **kw)
    model = ImageReward(med_config=str(med_config), device="cpu")  # random BLIP ViT-L + BERT + MLP
    # The package's head init (std 1/769) makes a random head answer ~0 whatever the image, so every image would
    # score the same (-0.1618); torch's default init lets the random model tell images apart.
    for layer in model.mlp.layers:
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    checkpoint = out / "ImageReward.pt"  # THUDM's release: the bare state dict
    torch.save(model.state_dict(), checkpoint)
    broken = out / "broken" / "ImageReward.pt"
    broken.parent.mkdir(exist_ok=True)
    torch.save({}, broken)
    return {"files": {"checkpoint_path": str(checkpoint), "med_config": str(med_config),
                      "tokenizer_path": str(tokenizer)},
            "broken": {"checkpoint_path": str(broken)}}


MAKERS = {"hpsv2": hpsv2, "imagereward": imagereward}

if __name__ == "__main__":
    name, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(json.dumps(MAKERS[name](out)))
