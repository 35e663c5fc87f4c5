"""medvol.engines: the self-supervised trainer/evaluator on monai.engines, deterministic data, handlers, and the
standard bundle workflow built from them (:mod:`medvol.engines.workflow`)."""

from medvol.engines import config
from medvol.engines.console import EpochSummary, MetricsReport, SingleRenderProgressBar, quiet_engine_logger
from medvol.engines.data import SeededDataset, SeededSampler, make_loader, sample_seed
from medvol.engines.distributed import default_device, destroy_process_group, prepare_network
from medvol.engines.embedding import SliceStackInferer, embed_stack
from medvol.engines.handlers import (
    EpochHookHandler,
    ModelSaver,
    MomentumUpdateHandler,
    PerClassMetrics,
    QueueUpdateHandler,
    ResumableCheckpoint,
    scalar_outputs,
)
from medvol.engines.image_report import image_report_inference
from medvol.engines.trainer import SSLEvaluator, SSLTrainer, prepare_ssl_batch, prepare_supervised_batch
from medvol.engines.workflow import (
    build_evaluator,
    build_inference,
    build_segmentation_evaluator,
    build_trainer,
    default_checkpoint,
    evaluation_datalist,
    inference_dataset,
    lower_is_better,
    segmentation_writer,
)
