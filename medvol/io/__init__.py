"""medvol.io: datalists, volume readers (NIfTI, MetaImage, NRRD, DICOM series), atomic writers, manifests."""

from medvol.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text, remove_stale_temps, save_nifti
from medvol.io.bags import Bag, bag_filename, file_sha256, find_bags, read_bag, write_bag, write_slice_bag
from medvol.io.checkpoint import read_checkpoint
from medvol.io.datalist import (
    IMAGE_LABEL_DIRS,
    case_name,
    check_datalist,
    datalist_from_csv,
    datalist_from_folder,
    datalist_from_msd,
    filter_cases,
    find_volumes,
    image_datalist,
    labeled_datalist,
    load_datalist,
    open_datalist,
    with_case_index,
)
from medvol.io.dicom import (
    check_dicom_series,
    is_dicom_dir,
    is_dicom_file,
    is_series_uid,
    list_series,
    read_dicom_series,
    split_series_ref,
)
from medvol.io.lesion_boxes import lesion_datalist, load_lesion_boxes
from medvol.io.manifest import MANIFEST_COLUMNS, STATUSES, Manifest, read_manifest
from medvol.io.readers import (
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    VOLUME_SUFFIXES,
    LoadVolume,
    LoadVolumed,
    VolumeReader,
    check_volume,
    is_volume_path,
    volume_suffix,
)
from medvol.io.reports import image_report_datalist, join_sentences, report_sentences, split_sentences
from medvol.io.splits import AUTO_MIN_ITEMS, AUTO_VAL_FRACTION, load_split, select_labeled, split_datalist
