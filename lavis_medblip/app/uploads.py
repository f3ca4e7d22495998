"""What the web app accepts: the upload's file type and its unpacking, and the EHR form fields as the sentence the
model reads; anything else is an :class:`InputProblem` naming it, with its HTTP status."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any, Mapping

from lavis_medblip.annotations.ehr import describe_ehr, sex_of

#: What an upload may be, by its name's ending; a .zip holds one DICOM series (or one volume file).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".npy", ".zip")
#: Suffixes NiiVue reads itself; other uploads are shown as the NIfTI the readers make of them.
VIEWER_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
DEFAULT_MAX_UPLOAD_MB = 512
#: EHR form field -> (annotation schema key, lowest, highest); see :data:`lavis_medblip.annotations.schema.EHR_FIELDS`.
EHR_FORM_FIELDS = {"age": ("age", 0, 130), "education": ("education_years", 0, 40), "mmse": ("mmse", 0, 30),
                   "cdr": ("cdr_global", 0, 3)}


class InputProblem(ValueError):
    """A request the app cannot serve; ``status`` is its HTTP status (4xx), the message names the problem."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def ehr_text(fields: Mapping[str, str | None], free_text: str | None = None) -> str:
    """The EHR sentence the model reads: ``free_text`` when given, else :func:`describe_ehr` of the form fields
    (``age``, ``sex``, ``education``, ``mmse``, ``cdr``; blank ones left out), as the cohort builders write it."""
    if free_text and free_text.strip():
        return free_text.strip()
    record: dict[str, Any] = {}
    for name, (key, low, high) in EHR_FORM_FIELDS.items():
        raw = (fields.get(name) or "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            raise InputProblem(f"EHR field {name}: {raw!r} is not a number") from None
        if not low <= value <= high:
            raise InputProblem(f"EHR field {name}: {raw} is outside {low} to {high}")
        record[key] = value
    sex = (fields.get("sex") or "").strip()
    if sex:
        if sex_of(sex) is None:
            raise InputProblem(f"EHR field sex: {sex!r} is not one of F, M (female, male)")
        record["sex"] = sex
    return describe_ehr(record) if record else ""


def upload_suffix(filename: str) -> str:
    """The upload's suffix from :data:`UPLOAD_SUFFIXES` (lower case), or :class:`InputProblem` naming the file."""
    name = filename.lower()
    for suffix in UPLOAD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise InputProblem(f"{filename}: unsupported file type; upload a NIfTI (.nii, .nii.gz), MGH/MGZ, .npy, "
                       "or a .zip of one DICOM series", status=415)


def unpack_zip(archive: Path, folder: Path, filename: str, max_bytes: int) -> Path:
    """The one scan (DICOM-series folder or volume file) inside ``archive``, unpacked into ``folder``."""
    from lavis_medblip.inference import find_scans

    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [member for member in zipped.infolist() if not member.is_dir()]
            if sum(member.file_size for member in members) > max_bytes:
                raise InputProblem(f"{filename}: unpacks to more than the {max_bytes // 2**20} MB limit", status=413)
            for member in members:
                target = (folder / member.filename).resolve()
                if not target.is_relative_to(folder.resolve()):
                    raise InputProblem(f"{filename}: member {member.filename!r} points outside the archive")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError) as error:
        raise InputProblem(f"{filename}: not a readable .zip ({error})") from None
    scans = find_scans(folder)
    if len(scans) != 1:
        found = "no scan" if not scans else f"{len(scans)} scans ({', '.join(p.relative_to(folder).as_posix() for p in scans[:4])})"
        raise InputProblem(f"{filename}: the .zip holds {found}; it must hold one DICOM series")
    return scans[0]
