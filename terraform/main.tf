locals {
  use_vertex  = var.gemini_mode == "vertex"
  use_api_key = var.gemini_mode == "api_key"
  use_budget  = var.daily_budget_usd != null

  # The APIs the data sources and the IAM resources call. A fixed set on purpose: a data
  # source that depends on a resource with pending changes is read at apply time, not
  # at plan, so data sources wait for these only (their changes are pending on the
  # first apply alone), never for the mode-dependent set below.
  core_services = toset([
    "cloudresourcemanager.googleapis.com", # project IAM members, data.google_project
    "iam.googleapis.com",                  # service accounts, custom roles
    "storage.googleapis.com",              # buckets, their IAM, the storage service agent
  ])

  services = toset(concat(
    [
      "artifactregistry.googleapis.com", # built function images
      "cloudbuild.googleapis.com",       # builds them from the uploaded source
      "cloudfunctions.googleapis.com",
      "eventarc.googleapis.com",
      "logging.googleapis.com",
      "pubsub.googleapis.com", # transport of the storage events
      "run.googleapis.com",    # 2nd-gen functions are Cloud Run services
    ],
    local.use_vertex ? ["aiplatform.googleapis.com"] : [],
    local.use_api_key ? ["secretmanager.googleapis.com"] : [],
    local.use_budget ? ["monitoring.googleapis.com"] : [], # the budget's alert policy
  ))

  # A created bucket lives in var.region; an existing one may be anywhere, and the
  # trigger must sit in the bucket's own location (a multi-region bucket gives "us").
  watched_bucket          = var.create_bucket ? google_storage_bucket.watched[0].name : data.google_storage_bucket.existing[0].name
  watched_bucket_location = var.create_bucket ? lower(var.region) : lower(data.google_storage_bucket.existing[0].location)

  # Keys of the buckets the runtime may touch; plain variables so for_each knows them at plan time.
  runtime_buckets = toset(concat([var.bucket_name], var.allowed_buckets))

  api_key_secret_id = coalesce(var.gemini_api_key_secret_id, "${var.name_prefix}-gemini-api-key")

  caption_env = merge(
    {
      CAPTION_MODEL           = var.caption_model
      CAPTION_MAX_CONCURRENCY = tostring(var.caption_max_concurrency)
      CAPTION_MAX_EDGE        = tostring(var.caption_max_edge)
      CAPTION_MAX_BYTES       = tostring(var.caption_max_bytes)
      CAPTION_ALLOWED_BUCKETS = join(",", sort(local.runtime_buckets))
      CAPTION_LANGUAGES       = join(",", var.caption_languages)
      CAPTION_METADATA_PREFIX = var.caption_metadata_prefix
      CAPTION_MODE            = var.caption_mode
      CAPTION_BATCH_PREFIX    = var.caption_batch_prefix
      CAPTION_BUDGET_PREFIX   = var.caption_budget_prefix
    },
    var.daily_budget_usd == null ? {} : { CAPTION_DAILY_BUDGET_USD = tostring(var.daily_budget_usd) },
    var.caption_prompt == null ? {} : { CAPTION_PROMPT = var.caption_prompt },
    length(var.caption_rules) == 0 ? {} : { CAPTION_RULES = jsonencode(var.caption_rules) },
  )

  # Vertex AI is reached with the runtime service account (ADC); the API key, in the
  # other mode, only ever arrives through secret_environment_variables below.
  gemini_env = local.use_vertex ? {
    GOOGLE_GENAI_USE_VERTEXAI = "true"
    GOOGLE_CLOUD_PROJECT      = var.project_id
    GOOGLE_CLOUD_LOCATION     = var.vertex_location
  } : {}

  runtime_env = merge(local.caption_env, local.gemini_env)

  # caption_http answers with what is done when CAPTION_HTTP_DEADLINE passes, so it must
  # come before the function's own timeout cuts the request off: 30 s earlier (half the
  # timeout when that is under a minute).
  http_deadline_seconds = max(var.http_timeout_seconds - 30, var.http_timeout_seconds / 2)
  http_env              = merge(local.runtime_env, { CAPTION_HTTP_DEADLINE = tostring(local.http_deadline_seconds) })
}

resource "google_project_service" "core" {
  for_each = local.core_services

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

resource "google_project_service" "enabled" {
  for_each = local.services

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

# These three were in google_project_service.enabled before the split.
moved {
  from = google_project_service.enabled["cloudresourcemanager.googleapis.com"]
  to   = google_project_service.core["cloudresourcemanager.googleapis.com"]
}

moved {
  from = google_project_service.enabled["iam.googleapis.com"]
  to   = google_project_service.core["iam.googleapis.com"]
}

moved {
  from = google_project_service.enabled["storage.googleapis.com"]
  to   = google_project_service.core["storage.googleapis.com"]
}

# ---------------------------------------------------------------------------
# The watched bucket: created here, or an existing one read by name
# ---------------------------------------------------------------------------

resource "google_storage_bucket" "watched" {
  count = var.create_bucket ? 1 : 0

  #checkov:skip=CKV_GCP_62:Usage logs need a second, dedicated log bucket this module does not own; audit object reads with Cloud Audit Logs (storage Data Access) instead.

  project                     = var.project_id
  name                        = var.bucket_name
  location                    = upper(var.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.bucket_force_destroy

  versioning {
    enabled = var.bucket_versioning
  }

  dynamic "lifecycle_rule" {
    for_each = var.bucket_versioning ? [var.bucket_noncurrent_version_days] : []
    content {
      condition {
        days_since_noncurrent_time = lifecycle_rule.value
      }
      action {
        type = "Delete"
      }
    }
  }

  depends_on = [google_project_service.core]
}

# The runtime's object role is a project-level custom role, and IAM lets a project's
# custom role be granted only on that project and the resources inside it
# (https://cloud.google.com/iam/docs/understanding-custom-roles). So every bucket the
# module grants on must live in project_id; a bucket elsewhere would fail the grant at
# apply. These reads fail the plan instead (or the first apply, before any grant).
data "google_storage_bucket" "existing" {
  count = var.create_bucket ? 0 : 1

  name = var.bucket_name

  lifecycle {
    postcondition {
      condition     = tostring(self.project_number) == data.google_project.this.number
      error_message = "bucket_name (with create_bucket = false) must be a bucket in project_id: Eventarc storage triggers and the module's custom object role only work inside that project."
    }
  }

  depends_on = [google_project_service.core]
}

data "google_storage_bucket" "allowed" {
  for_each = toset([for name in var.allowed_buckets : name if name != var.bucket_name])

  name = each.value

  lifecycle {
    postcondition {
      condition     = tostring(self.project_number) == data.google_project.this.number
      error_message = "Every bucket in allowed_buckets must be in project_id: the object role is a custom role of project_id, which IAM only lets the module grant inside that project. For a bucket in another project, grant the runtime service account (output runtime_service_account_email) a role there yourself."
    }
  }

  depends_on = [google_project_service.core]
}

# ---------------------------------------------------------------------------
# Function source: the repository root, zipped, named by its hash
# ---------------------------------------------------------------------------

resource "google_storage_bucket" "source" {
  #checkov:skip=CKV_GCP_62:Holds only build inputs Terraform uploads; usage logs would need another bucket and add nothing.
  #checkov:skip=CKV_GCP_78:Every archive gets a new object name (its MD5), so nothing is ever overwritten and versioning would keep nothing.

  project                     = var.project_id
  name                        = "${var.project_id}-${var.name_prefix}-source"
  location                    = upper(var.region)
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  # Only rebuildable archives live here, so it never blocks a destroy.
  force_destroy = true

  depends_on = [google_project_service.core]
}

# The deployed folder is what the python312 runtime sees: main.py, requirements.txt
# and src/captioner/ (main.py puts src/ on sys.path). Everything else stays home.
# Patterns are doublestar globs relative to the repository root; a matching
# directory is skipped whole.
data "archive_file" "source" {
  type        = "zip"
  source_dir  = "${path.module}/.."
  output_path = "${path.module}/.terraform/captioner-source.zip"
  excludes = [
    ".git",
    ".github",
    ".ci",
    ".venv*",
    ".env",
    ".env.*",
    "tests",
    "terraform",
    "bench",
    "docs",
    "src/captioner_dev",
    "**/__pycache__",
    "**/*.pyc",
    "**/.pytest_cache",
    "**/.mypy_cache",
    "**/.ruff_cache",
    "**/.hypothesis",
    "**/*.egg-info",
    "build",
    "dist",
    "Makefile",
    "pyproject.toml",
    "requirements-dev.txt",
    "requirements-stack.txt",
    "README.md",
    ".gitignore",
  ]
}

resource "google_storage_bucket_object" "source" {
  # A new name for new content is what makes a code change redeploy both functions.
  name   = "captioner-${data.archive_file.source.output_md5}.zip"
  bucket = google_storage_bucket.source.name
  source = data.archive_file.source.output_path
}

# ---------------------------------------------------------------------------
# Gemini API key (gemini_mode = "api_key"): the secret container only
# ---------------------------------------------------------------------------

resource "google_secret_manager_secret" "gemini_api_key" {
  count = local.use_api_key ? 1 : 0

  project   = var.project_id
  secret_id = local.api_key_secret_id

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}

# ---------------------------------------------------------------------------
# The two functions
# ---------------------------------------------------------------------------

resource "google_cloudfunctions2_function" "caption_on_upload" {
  project     = var.project_id
  name        = "${var.name_prefix}-on-upload"
  location    = var.region
  description = "Captions every object finalized in the watched bucket with Gemini and writes the caption as object metadata."

  build_config {
    runtime         = "python312"
    entry_point     = "caption_on_upload"
    service_account = var.build_service_account

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email = google_service_account.runtime.email
    # Eventarc's push counts as internal traffic; nothing else needs to reach this one.
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
    min_instance_count               = var.min_instances
    max_instance_count               = var.max_instances
    max_instance_request_concurrency = var.max_instance_request_concurrency
    available_cpu                    = var.cpu
    available_memory                 = var.memory
    timeout_seconds                  = var.event_timeout_seconds
    environment_variables            = local.runtime_env

    dynamic "secret_environment_variables" {
      for_each = local.use_api_key ? [google_secret_manager_secret.gemini_api_key[0].secret_id] : []
      content {
        key = "GEMINI_API_KEY"
        # The provider's docs prefer the project number here, but take the ID too. The ID
        # gives a stable plan: the provider stores what the API returns, and its own
        # acceptance-tested example (cloudfunctions2_secret_env) passes the project ID
        # and must plan empty after apply. The number would have to come from
        # data.google_project, unknown until read, which on a first apply is at apply
        # time. (The permadiff of issue #11383 is the 1st-gen resource's, which only
        # accepts numbers.)
        project_id = var.project_id
        secret     = secret_environment_variables.value
        version    = var.gemini_api_key_secret_version
      }
    }
  }

  event_trigger {
    trigger_region        = local.watched_bucket_location
    event_type            = "google.cloud.storage.object.v1.finalized"
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.trigger.email

    event_filters {
      attribute = "bucket"
      value     = local.watched_bucket
    }
  }

  lifecycle {
    precondition {
      condition     = var.max_instance_request_concurrency == 1 || tonumber(var.cpu) >= 1
      error_message = "max_instance_request_concurrency above 1 needs cpu of at least \"1\"."
    }
    precondition {
      condition     = var.min_instances <= var.max_instances
      error_message = "min_instances must not exceed max_instances."
    }
    precondition {
      condition     = local.cpu_memory_ok
      error_message = "cpu and memory must be a pair Cloud Run accepts: cpu below 0.5 takes 128Mi to 512Mi, 0.5 to below 1 takes 128Mi to 1Gi, \"1\" 128Mi to 4Gi, \"2\" 128Mi to 8Gi, \"4\" 2Gi to 16Gi, \"6\" 4Gi to 24Gi, \"8\" 4Gi to 32Gi (see terraform/limits.tf)."
    }
  }

  # The trigger is created with the function: Eventarc refuses a storage trigger until
  # the storage service agent may publish and the trigger account may receive events.
  depends_on = [
    google_project_service.enabled,
    google_project_iam_member.gcs_pubsub_publisher,
    google_project_iam_member.trigger_event_receiver,
    google_service_account_iam_member.pubsub_token_creator,
    google_storage_bucket_iam_member.runtime_objects,
    google_project_iam_member.runtime_vertex,
    google_secret_manager_secret_iam_member.runtime_api_key,
  ]
}

resource "google_cloudfunctions2_function" "caption_http" {
  #checkov:skip=CKV_GCP_124:Ingress is the validated variable http_ingress. Its default ALLOW_ALL lets operators call from outside the VPC; every call still needs an identity token with roles/run.invoker, and the function can never be made public.

  project     = var.project_id
  name        = "${var.name_prefix}-http"
  location    = var.region
  description = "Captions objects, a prefix or image URLs on request; callers need roles/run.invoker (never public)."

  build_config {
    runtime         = "python312"
    entry_point     = "caption_http"
    service_account = var.build_service_account

    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email            = google_service_account.runtime.email
    ingress_settings                 = var.http_ingress
    all_traffic_on_latest_revision   = true
    min_instance_count               = var.min_instances
    max_instance_count               = var.max_instances
    max_instance_request_concurrency = var.max_instance_request_concurrency
    available_cpu                    = var.cpu
    available_memory                 = var.memory
    timeout_seconds                  = var.http_timeout_seconds
    environment_variables            = local.http_env

    dynamic "secret_environment_variables" {
      for_each = local.use_api_key ? [google_secret_manager_secret.gemini_api_key[0].secret_id] : []
      content {
        key = "GEMINI_API_KEY"
        # The provider's docs prefer the project number here, but take the ID too. The ID
        # gives a stable plan: the provider stores what the API returns, and its own
        # acceptance-tested example (cloudfunctions2_secret_env) passes the project ID
        # and must plan empty after apply. The number would have to come from
        # data.google_project, unknown until read, which on a first apply is at apply
        # time. (The permadiff of issue #11383 is the 1st-gen resource's, which only
        # accepts numbers.)
        project_id = var.project_id
        secret     = secret_environment_variables.value
        version    = var.gemini_api_key_secret_version
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.max_instance_request_concurrency == 1 || tonumber(var.cpu) >= 1
      error_message = "max_instance_request_concurrency above 1 needs cpu of at least \"1\"."
    }
    precondition {
      condition     = var.min_instances <= var.max_instances
      error_message = "min_instances must not exceed max_instances."
    }
    precondition {
      condition     = local.cpu_memory_ok
      error_message = "cpu and memory must be a pair Cloud Run accepts: cpu below 0.5 takes 128Mi to 512Mi, 0.5 to below 1 takes 128Mi to 1Gi, \"1\" 128Mi to 4Gi, \"2\" 128Mi to 8Gi, \"4\" 2Gi to 16Gi, \"6\" 4Gi to 24Gi, \"8\" 4Gi to 32Gi (see terraform/limits.tf)."
    }
  }

  depends_on = [
    google_project_service.enabled,
    google_storage_bucket_iam_member.runtime_objects,
    google_project_iam_member.runtime_vertex,
    google_secret_manager_secret_iam_member.runtime_api_key,
  ]
}
