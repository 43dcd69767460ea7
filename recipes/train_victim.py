"""Train a victim on a (protected) dataset with transformers Trainer; report clean test accuracy.

    accelerate launch recipes/train_victim.py --dataset org/cifar10-sep --eval_dataset cifar10 \
        --model resnet18_cifar --push_to_hub --hub_model_id org/cifar10-sep-victim-resnet18 --update_dataset_card

    accelerate launch recipes/train_victim.py --dataset runs/protect-sep-fa-vr/dataset --eval_dataset cifar10 --preset cpu
    accelerate launch recipes/train_victim.py --dataset runs/protect-sep-fa-vr/dataset --eval_dataset cifar10 \
        --preset cpu --defense at --at_eps 8

The victim is a TimmWrapperForImageClassification (any timm name, or the registered *_cifar ones;
--pretrained fine-tunes timm's Hub weights), trained from scratch with the source recipe of
--preset and evaluated every epoch on the CLEAN --eval_split of --eval_dataset with the shipped
`evaluate` accuracy module.

--defense picks the appropriator's training (one module each in sep_hf/defenses/): none (standard), at (PGD
adversarial training, --at_eps 4 --at_steps 10, step eps/4), rse (Random Self-Ensemble noise
before every convolution, --rse_init_std 0.2 --rse_inner_std 0.1, --rse_draws 10 at evaluation),
jpeg (JPEG-recompressed training images, --jpeg_quality 10) or grayscale (grayscale training
images). Transforms apply to training images only; evaluation is always on the clean split.

Writes OUTPUT_DIR/results.json (eval_accuracy, per-epoch history, defense and defense_settings) and
OUTPUT_DIR/model (weights, image processor, card whose model-index holds the accuracy).
"""

import sys

from sep_hf.cli import run_main, train_victim

if __name__ == "__main__":
    run_main(train_victim, sys.argv[1:])  # the same as `sep-hf train-victim` (sep_hf/cli.py)
