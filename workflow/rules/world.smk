# The miniature world: prompt splits in GenEval metadata format.


if config["world"]["enabled"]:

    rule world_prompts:
        output:
            train=f"{R}/world/train_metadata.jsonl",
            test=f"{R}/world/test_metadata.jsonl",
        log:
            f"{R}/logs/world_prompts.log",
        params:
            config=sections("world"),
        message:
            "Writing the miniature world's train/test prompt splits"
        script:
            "../scripts/world_prompts.py"
