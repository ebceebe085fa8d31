"""The Slurm launcher: :mod:`.render` (the sbatch script, pure) | :mod:`.cluster` (sbatch,
squeue, sacct, scancel, logs; locally or over SSH) | :mod:`.launch` (validate -> runs ->
render -> submit -> tag). The same three parts as :mod:`taskcodec.launch.k8s`."""

from taskcodec.launch.checks import PREEMPTED_EXIT, parse_time
from taskcodec.launch.slurm.cluster import (
                                            COMMENT_PREFIX,
                                            JOB_ID,
                                            Cluster,
                                            JobInfo,
                                            SlurmError,
                                            format_jobs,
                                            make_comment,
                                            parse_comment,
                                            parse_squeue,
)
from taskcodec.launch.slurm.launch import Launched, launch, prepare
from taskcodec.launch.slurm.render import (
                                            _IGNORE,
                                            CREDENTIAL_VARS,
                                            DEFAULT_SIGNAL_GRACE,
                                            PASS_ENV,
                                            RELAY,
                                            SlurmOptions,
                                            parse_gpus,
                                            render_sbatch,
                                            sbatch_flags,
)

__all__ = ["COMMENT_PREFIX", "CREDENTIAL_VARS", "DEFAULT_SIGNAL_GRACE", "JOB_ID", "PASS_ENV",
           "PREEMPTED_EXIT", "RELAY", "_IGNORE", "Cluster", "JobInfo", "Launched", "SlurmError",
           "SlurmOptions", "format_jobs", "launch", "make_comment", "parse_comment", "parse_gpus",
           "parse_squeue", "parse_time", "prepare", "render_sbatch", "sbatch_flags"]
