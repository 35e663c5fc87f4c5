"""medvol.methods: pretext tasks, each a module of views + loss on a shared backbone (see base.SSLMethod)."""

from medvol.methods.base import SSLMethod
from medvol.methods.caid import CAiD
from medvol.methods.glcl import GlobalLocalContrastive, positive_mask
from medvol.methods.lecl import LeCL
from medvol.methods.mae import MAE
from medvol.methods.patch_cluster import PatchClustering
from medvol.methods.pixel_cluster import PixelClustering
from medvol.methods.spark import SparK
