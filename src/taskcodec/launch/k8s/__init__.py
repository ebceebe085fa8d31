"""The Kubernetes launcher: :mod:`.render` (the Job manifests, pure) | :mod:`.cluster` (the API
server: create, watch, log, delete) | :mod:`.launch` (validate -> render -> runs -> submit ->
tag). The same three parts as :mod:`taskcodec.launch.slurm`."""

from taskcodec.launch.checks import PREEMPTED_EXIT, parse_duration, parse_quantity
from taskcodec.launch.k8s.cluster import (
                                          Cluster,
                                          JobState,
                                          KubernetesError,
                                          PodState,
                                          cancel,
                                          connect,
                                          job_status,
                                          list_jobs,
                                          pod_logs,
                                          submit,
)
from taskcodec.launch.k8s.launch import launch, prepare
from taskcodec.launch.k8s.render import (
                                          ANN_EXPERIMENT,
                                          ANN_PARAMS,
                                          ANN_RUN_IDS,
                                          ANN_TRACKING_URI,
                                          DEFAULT_IMAGE,
                                          DEFAULT_MOUNT,
                                          GPU_PRODUCT_LABEL,
                                          IMAGE_PROJECT_DIR,
                                          LABEL_LAUNCH,
                                          LABEL_RUN_ID,
                                          MANAGED_BY,
                                          K8sOptions,
                                          check_name,
                                          container_command,
                                          default_job_name,
                                          index_script,
                                          parse_secret_env,
                                          parse_toleration,
                                          render_job,
                                          render_jobs,
                                          to_yaml,
                                          unmounted_paths,
                                          validate,
)

__all__ = ["ANN_EXPERIMENT", "ANN_PARAMS", "ANN_RUN_IDS", "ANN_TRACKING_URI", "DEFAULT_IMAGE",
           "DEFAULT_MOUNT", "GPU_PRODUCT_LABEL", "IMAGE_PROJECT_DIR", "LABEL_LAUNCH",
           "LABEL_RUN_ID", "MANAGED_BY", "PREEMPTED_EXIT", "Cluster", "JobState", "K8sOptions",
           "KubernetesError", "PodState", "cancel", "check_name", "connect", "container_command",
           "default_job_name", "index_script", "job_status", "launch", "list_jobs",
           "parse_duration", "parse_quantity", "parse_secret_env", "parse_toleration",
           "pod_logs", "prepare", "render_job", "render_jobs", "submit", "to_yaml",
           "unmounted_paths", "validate"]
