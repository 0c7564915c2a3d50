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

    rule world_prompt_sets:
        # The test split as stand-ins of the paper's evaluation prompt sets (world.prompt_sets).
        input:
            test=rules.world_prompts.output.test,
        output:
            parti=f"{R}/world/prompt_sets/parti_prompts.tsv",
            pickapic=directory(f"{R}/world/prompt_sets/pickapic_v2_test_unique"),
        log:
            f"{R}/logs/world_prompt_sets.log",
        message:
            "Writing the test split as a Parti-Prompts TSV and Pick-a-Pic v2 Parquet shards"
        script:
            "../scripts/world_prompt_sets.py"
