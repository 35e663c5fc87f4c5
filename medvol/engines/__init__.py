"""medvol.engines: the self-supervised trainer/evaluator on monai.engines, deterministic data, handlers."""

from medvol.engines import config
from medvol.engines.data import SeededDataset, SeededSampler, make_loader, sample_seed
from medvol.engines.embedding import SliceStackInferer, embed_stack
from medvol.engines.handlers import (
    EpochHookHandler,
    ModelSaver,
    MomentumUpdateHandler,
    QueueUpdateHandler,
    ResumableCheckpoint,
    scalar_outputs,
    warmup_cosine_schedule,
)
from medvol.engines.reports import DiceReport, dice_per_class
from medvol.engines.trainer import SSLEvaluator, SSLTrainer, prepare_ssl_batch, prepare_supervised_batch
