"""medvol.methods: pretext tasks, each a module of views + loss on a shared backbone (see base.SSLMethod)."""

from medvol.methods.base import SSLMethod
from medvol.methods.byol import BYOL
from medvol.methods.caid import CAiD
from medvol.methods.glcl import GlobalLocalContrastive, positive_mask
from medvol.methods.lecl import LeCL
from medvol.methods.lovt import LoVT
from medvol.methods.mae import MAE
from medvol.methods.models_genesis import ModelsGenesis
from medvol.methods.patch_cluster import PatchClustering
from medvol.methods.pcrlv2 import PCRLv2
from medvol.methods.pixel_cluster import PixelClustering
from medvol.methods.simclr import SimCLR
from medvol.methods.spark import SparK
from medvol.methods.swin_ssl import SwinSSL, SwinViTExport, monai_swinvit_checkpoint, swinvit_state_dict
from medvol.methods.voco import VoCo
