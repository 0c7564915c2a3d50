# Sample the frozen base generator once for a fixed bank of training noises (reused by every
# training run) and for the evaluation noises (the base generator's evaluation).


rule reference_bank:
    input:
        unpack(model_inputs),
        prompts=train_prompts(),
    output:
        bank=f"{R}/reference/train_bank.safetensors",
    log:
        f"{R}/logs/reference_bank.log",
    params:
        config=sections("device", "models", "train", "evaluate"),
    message:
        "Sampling the frozen base generator for the training noise bank"
    resources:
        gpu=1 if config["device"] == "cuda" else 0,
    script:
        "../scripts/reference_bank.py"
