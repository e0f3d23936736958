"""Every derived seed of a run, by name, in one place.

A run has two seeds: ``seed`` (training randomness: initialisation, batches, attacks, noise) and ``data.split_seed``
(which images go where). Each use below adds its own offset, so two uses never draw the same random stream; the
values are part of every result and must never change."""

# data.split_seed + ...: the seeded subsets of the data
TRAIN_SUBSET = 1      # data.train_subset of the training split
TEST_SUBSET = 2       # data.test_subset of the test set
VAL_SUBSET = 3        # train.val_subset: the validation images the train and prune stages score every epoch
BENCH_SUBSET = 4      # bench.accuracy_subset: the images the devices predict
EVAL_SUBSET = 5       # eval.images: the images the eval and transfer stages attack
CALIBRATION = 6       # quantize.calibration_images: training images for the int8 activation ranges

# seed + ...: the training stages' own streams
PRUNE = 1             # the prune stage's generator and attack streams (train uses the seed itself)
FINETUNE = 2          # the finetune stage's
