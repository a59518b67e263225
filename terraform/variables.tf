# Validations may only look at their own variable on Terraform 1.5, and `||` / `&&`
# do not short-circuit before 1.12: conditions that could fail on a null or a
# non-number are wrapped in can() / try() for that reason.

# ---------------------------------------------------------------------------
# Project and naming
# ---------------------------------------------------------------------------

variable "project_id" {
  type        = string
  description = "ID of the Google Cloud project to deploy into (the ID, not the number or display name)."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a project ID: 6 to 30 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "region" {
  type        = string
  description = "Region of both functions and, when the module creates it, of the watched bucket (e.g. us-central1)."
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a Google Cloud region such as us-central1 or europe-west4."
  }
}

variable "name_prefix" {
  type        = string
  description = "Prefix of every named resource (functions, service accounts, source bucket, custom role, secret)."
  default     = "captioner"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3 to 20 lowercase letters, digits or hyphens, start with a letter and not end with a hyphen."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels put on every resource that takes labels (through the provider's default_labels)."
  default     = { app = "captioner" }

  validation {
    condition = alltrue([
      for key, value in var.labels :
      can(regex("^[a-z][a-z0-9_-]{0,62}$", key)) && can(regex("^[a-z0-9_-]{0,63}$", value))
    ])
    error_message = "Label keys must start with a lowercase letter; keys and values may hold only lowercase letters, digits, '_' and '-', 63 characters at most."
  }
}

# ---------------------------------------------------------------------------
# The watched bucket
# ---------------------------------------------------------------------------

variable "create_bucket" {
  type        = bool
  description = "true: the module creates the watched bucket named bucket_name. false: bucket_name is an existing bucket in project_id."
  default     = true
}

variable "bucket_name" {
  type        = string
  description = "Name of the bucket whose uploads are captioned (created or existing, see create_bucket)."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a bucket name: 3 to 63 lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or digit."
  }
}

variable "bucket_versioning" {
  type        = bool
  description = "Keep noncurrent object versions in the created bucket (ignored for an existing bucket)."
  default     = true
}

variable "bucket_noncurrent_version_days" {
  type        = number
  description = "With versioning on, delete noncurrent versions this many days after they became noncurrent."
  default     = 30

  validation {
    condition     = var.bucket_noncurrent_version_days >= 1 && floor(var.bucket_noncurrent_version_days) == var.bucket_noncurrent_version_days
    error_message = "bucket_noncurrent_version_days must be a whole number of days, 1 or more."
  }
}

variable "bucket_force_destroy" {
  type        = bool
  description = "Let `terraform destroy` delete the created bucket even when it still holds objects. Leave false unless the images are disposable."
  default     = false
}

variable "allowed_buckets" {
  type        = list(string)
  description = "Other existing buckets the HTTP function may caption. They join CAPTION_ALLOWED_BUCKETS and get the same object-level grant as the watched bucket. Uploads to them trigger nothing."
  default     = []

  validation {
    condition     = alltrue([for name in var.allowed_buckets : can(regex("^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$", name))])
    error_message = "Every entry of allowed_buckets must be a bare bucket name (no gs:// prefix, no path)."
  }
}

# ---------------------------------------------------------------------------
# Gemini access
# ---------------------------------------------------------------------------

variable "gemini_mode" {
  type        = string
  description = "How the functions reach Gemini: \"vertex\" (Vertex AI with the runtime service account, no key) or \"api_key\" (a Gemini API key read from Secret Manager)."
  default     = "vertex"

  validation {
    condition     = contains(["vertex", "api_key"], var.gemini_mode)
    error_message = "gemini_mode must be \"vertex\" or \"api_key\"."
  }
}

variable "vertex_location" {
  type        = string
  description = "Vertex AI location for Gemini calls (GOOGLE_CLOUD_LOCATION) when gemini_mode is \"vertex\": \"global\" or a region."
  default     = "global"

  validation {
    condition     = can(regex("^(global|[a-z]+-[a-z]+[0-9]+)$", var.vertex_location))
    error_message = "vertex_location must be \"global\" or a region such as us-central1."
  }
}

variable "gemini_api_key_secret_id" {
  type        = string
  description = "Secret Manager secret ID the module creates (empty) for the Gemini API key when gemini_mode is \"api_key\". null means \"<name_prefix>-gemini-api-key\". The key itself is added out of band with `gcloud secrets versions add`, so it never enters Terraform state."
  default     = null

  validation {
    condition     = var.gemini_api_key_secret_id == null || can(regex("^[A-Za-z0-9_-]{1,255}$", var.gemini_api_key_secret_id))
    error_message = "gemini_api_key_secret_id must be 1 to 255 letters, digits, '_' or '-'."
  }
}

variable "gemini_api_key_secret_version" {
  type        = string
  description = "Version of the API key secret mounted as GEMINI_API_KEY: \"latest\" or a version number. A number makes key rotation an explicit redeploy."
  default     = "latest"

  validation {
    condition     = can(regex("^(latest|[1-9][0-9]*)$", var.gemini_api_key_secret_version))
    error_message = "gemini_api_key_secret_version must be \"latest\" or a positive version number."
  }
}

# ---------------------------------------------------------------------------
# Who may call what
# ---------------------------------------------------------------------------

variable "http_invokers" {
  type        = list(string)
  description = "IAM members allowed to call the HTTP function (roles/run.invoker on its service), e.g. \"user:ops@example.com\" or \"serviceAccount:batch@p.iam.gserviceaccount.com\". The function is never public."
  default     = []

  validation {
    condition     = alltrue([for member in var.http_invokers : !contains(["allUsers", "allAuthenticatedUsers"], member)])
    error_message = "http_invokers must not contain allUsers or allAuthenticatedUsers: the HTTP function is never public."
  }

  validation {
    condition     = alltrue([for member in var.http_invokers : can(regex("^(user|serviceAccount|group|domain|principal|principalSet):.+$", member))])
    error_message = "Every entry of http_invokers must be an IAM member such as user:EMAIL, serviceAccount:EMAIL, group:EMAIL or domain:DOMAIN."
  }
}

variable "http_ingress" {
  type        = string
  description = "Network ingress of the HTTP function. ALLOW_ALL still requires an identity token with roles/run.invoker; ALLOW_INTERNAL_ONLY and ALLOW_INTERNAL_AND_GCLB also require the caller to be inside the project's VPC (or behind a load balancer)."
  default     = "ALLOW_ALL"

  validation {
    condition     = contains(["ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"], var.http_ingress)
    error_message = "http_ingress must be ALLOW_ALL, ALLOW_INTERNAL_ONLY or ALLOW_INTERNAL_AND_GCLB."
  }
}

variable "grant_pubsub_token_creator" {
  type        = bool
  description = "Grant the project's Pub/Sub service agent roles/iam.serviceAccountTokenCreator on the trigger service account (only on that account). Needed only in projects whose Pub/Sub service agent was created on or before 2021-04-08."
  default     = false
}

variable "build_service_account" {
  type        = string
  description = "Service account Cloud Build uses to build the functions, as projects/PROJECT/serviceAccounts/EMAIL. null keeps the project's default build service account."
  default     = null

  validation {
    condition     = var.build_service_account == null || can(regex("^projects/[^/]+/serviceAccounts/[^/@]+@[^/]+$", var.build_service_account))
    error_message = "build_service_account must look like projects/PROJECT/serviceAccounts/NAME@PROJECT.iam.gserviceaccount.com."
  }
}

# ---------------------------------------------------------------------------
# Scaling and limits (both functions)
# ---------------------------------------------------------------------------

variable "min_instances" {
  type        = number
  description = "Instances each function keeps warm. 0 scales to zero (a cold start costs a few seconds)."
  default     = 0

  validation {
    condition     = var.min_instances >= 0 && var.min_instances <= 100 && floor(var.min_instances) == var.min_instances
    error_message = "min_instances must be a whole number from 0 to 100."
  }
}

variable "max_instances" {
  type        = number
  description = "Most instances each function may run at once; with the concurrency below it caps Gemini calls in flight."
  default     = 10

  validation {
    condition     = var.max_instances >= 1 && var.max_instances <= 1000 && floor(var.max_instances) == var.max_instances
    error_message = "max_instances must be a whole number from 1 to 1000."
  }
}

variable "max_instance_request_concurrency" {
  type        = number
  description = "Requests (events or HTTP calls) one instance serves at once. More than 1 needs cpu of at least 1."
  default     = 16

  validation {
    condition     = var.max_instance_request_concurrency >= 1 && var.max_instance_request_concurrency <= 1000 && floor(var.max_instance_request_concurrency) == var.max_instance_request_concurrency
    error_message = "max_instance_request_concurrency must be a whole number from 1 to 1000."
  }
}

variable "cpu" {
  type        = string
  description = "vCPUs per instance: \"1\", \"2\", \"4\", \"6\" or \"8\", or a fraction from 0.08 to below 1 (then concurrency must be 1)."
  default     = "1"

  validation {
    condition     = try(contains(["1", "2", "4", "6", "8"], var.cpu) || (tonumber(var.cpu) >= 0.08 && tonumber(var.cpu) < 1), false)
    error_message = "cpu must be \"1\", \"2\", \"4\", \"6\", \"8\" or a fraction from 0.08 to below 1."
  }
}

variable "memory" {
  type        = string
  description = "Memory per instance, e.g. \"512Mi\", \"1Gi\", \"2Gi\". Decoding large images is the main consumer."
  default     = "1Gi"

  validation {
    condition     = can(regex("^[1-9][0-9]*(Mi|Gi|M|G)$", var.memory))
    error_message = "memory must be a whole number followed by Mi, Gi, M or G, e.g. \"1Gi\"."
  }
}

variable "event_timeout_seconds" {
  type        = number
  description = "Timeout of one caption_on_upload invocation. Event-driven functions allow at most 540 s."
  default     = 540

  validation {
    condition     = var.event_timeout_seconds >= 1 && var.event_timeout_seconds <= 540 && floor(var.event_timeout_seconds) == var.event_timeout_seconds
    error_message = "event_timeout_seconds must be a whole number from 1 to 540."
  }
}

variable "http_timeout_seconds" {
  type        = number
  description = "Timeout of one caption_http request. HTTP functions allow up to 3600 s."
  default     = 540

  validation {
    condition     = var.http_timeout_seconds >= 1 && var.http_timeout_seconds <= 3600 && floor(var.http_timeout_seconds) == var.http_timeout_seconds
    error_message = "http_timeout_seconds must be a whole number from 1 to 3600."
  }
}

# ---------------------------------------------------------------------------
# Captioning settings (the CAPTION_* environment variables)
# ---------------------------------------------------------------------------

variable "caption_model" {
  type        = string
  description = "Gemini model that writes the captions (CAPTION_MODEL)."
  default     = "gemini-2.5-flash"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$", var.caption_model))
    error_message = "caption_model must be a model name such as gemini-2.5-flash."
  }
}

variable "caption_prompt" {
  type        = string
  description = "Instruction sent with every image (CAPTION_PROMPT). null keeps the application's built-in prompt."
  default     = null

  validation {
    condition     = try(length(trimspace(var.caption_prompt)) > 0 && length(var.caption_prompt) <= 4000, var.caption_prompt == null)
    error_message = "caption_prompt must be null or a non-blank string of at most 4000 characters."
  }
}

variable "caption_mode" {
  type        = string
  description = "CAPTION_MODE: \"structured\" (caption, alt text and tags under a response schema) or \"sentence\" (one plain sentence)."
  default     = "structured"

  validation {
    condition     = contains(["structured", "sentence"], var.caption_mode)
    error_message = "caption_mode must be \"structured\" or \"sentence\"."
  }
}

variable "caption_rules" {
  type = list(object({
    name    = string
    match   = optional(string)
    prefix  = optional(string)
    exclude = optional(bool)
    prompt  = optional(string)
    mode    = optional(string)
  }))
  description = "Per-prefix rules (CAPTION_RULES), first match wins: a glob \"match\" or a \"prefix\", and either exclude = true or a prompt and mode."
  default     = []

  validation {
    condition     = alltrue([for r in var.caption_rules : (r.match == null) != (r.prefix == null)])
    error_message = "Each rule in caption_rules needs exactly one of match or prefix."
  }
}

variable "caption_max_concurrency" {
  type        = number
  description = "Gemini calls in flight at most per instance (CAPTION_MAX_CONCURRENCY); a quarter more images are prepared ahead."
  default     = 16

  validation {
    condition     = var.caption_max_concurrency >= 1 && var.caption_max_concurrency <= 256 && floor(var.caption_max_concurrency) == var.caption_max_concurrency
    error_message = "caption_max_concurrency must be a whole number from 1 to 256."
  }
}

variable "caption_max_edge" {
  type        = number
  description = "Longest edge, in pixels, of the image sent to Gemini (CAPTION_MAX_EDGE)."
  default     = 768

  validation {
    condition     = var.caption_max_edge >= 64 && var.caption_max_edge <= 4096 && floor(var.caption_max_edge) == var.caption_max_edge
    error_message = "caption_max_edge must be a whole number from 64 to 4096."
  }
}

variable "caption_max_bytes" {
  type        = number
  description = "Largest object, in bytes, the functions will fetch (CAPTION_MAX_BYTES). Keep it well under memory."
  default     = 20971520

  validation {
    condition     = var.caption_max_bytes >= 1024 && var.caption_max_bytes <= 104857600 && floor(var.caption_max_bytes) == var.caption_max_bytes
    error_message = "caption_max_bytes must be a whole number from 1024 to 104857600 (100 MiB)."
  }
}

variable "caption_languages" {
  type        = list(string)
  description = "Caption languages as BCP 47 tags (CAPTION_LANGUAGES); the first one is written as the plain `caption` key."
  default     = ["en"]

  validation {
    condition = (
      length(var.caption_languages) >= 1
      && length(distinct(var.caption_languages)) == length(var.caption_languages)
      && alltrue([for tag in var.caption_languages : can(regex("^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$", tag))])
    )
    error_message = "caption_languages must list at least one language tag such as en, fr or pt-BR, each once."
  }
}

variable "caption_metadata_prefix" {
  type        = string
  description = "Prefix of the metadata keys written on images (CAPTION_METADATA_PREFIX)."
  default     = "caption"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_-]{0,31}$", var.caption_metadata_prefix))
    error_message = "caption_metadata_prefix must be 1 to 32 lowercase letters, digits, '_' or '-', starting with a letter or digit."
  }
}

variable "caption_batch_prefix" {
  type        = string
  description = "Folder of the watched bucket where `captioner batch` keeps its runs (CAPTION_BATCH_PREFIX). In Vertex mode the Vertex AI service agent may create objects under it and nowhere else."
  default     = "captioner-batch/"

  # The application's own rule (a folder name ending in "/", not starting with one, at
  # most 200 characters), plus no '"', '\' or control characters: the prefix is written
  # into the IAM Condition's CEL string literal.
  validation {
    condition     = length(var.caption_batch_prefix) <= 200 && can(regex("^[^/\"\\\\[:cntrl:]][^\"\\\\[:cntrl:]]*/$", var.caption_batch_prefix))
    error_message = "caption_batch_prefix must be a folder name ending in '/', such as \"captioner-batch/\": not starting with '/', at most 200 characters, without '\"', '\\' or control characters."
  }
}

variable "daily_budget_usd" {
  type        = number
  description = "US dollars Gemini may cost per UTC day and bucket, for uploads, HTTP and CLI backfills together (CAPTION_DAILY_BUDGET_USD). Once spent, uploads are acknowledged and left uncaptioned, with a `budget-exhausted` log line; a backfill after midnight catches up. null: no daily budget."
  default     = null
  nullable    = true

  validation {
    condition     = var.daily_budget_usd == null ? true : (var.daily_budget_usd > 0 && var.daily_budget_usd <= 1000000)
    error_message = "daily_budget_usd must be more than 0 (and at most 1,000,000), or null for no daily budget."
  }
}

variable "caption_budget_prefix" {
  type        = string
  description = "Folder of each bucket where the daily budget's ledger objects live, one per UTC day (CAPTION_BUDGET_PREFIX). The function may create and replace objects under it and nowhere else."
  default     = "captioner-budget/"

  # As caption_batch_prefix: the prefix is written into an IAM Condition's CEL string.
  validation {
    condition     = length(var.caption_budget_prefix) <= 200 && can(regex("^[^/\"\\\\[:cntrl:]][^\"\\\\[:cntrl:]]*/$", var.caption_budget_prefix))
    error_message = "caption_budget_prefix must be a folder name ending in '/', such as \"captioner-budget/\": not starting with '/', at most 200 characters, without '\"', '\\' or control characters."
  }
}

variable "alert_notification_channels" {
  type        = list(string)
  description = "Cloud Monitoring notification channel IDs (projects/P/notificationChannels/N) told when the daily budget is spent. Empty: the alert policy still opens incidents in the console."
  default     = []

  validation {
    condition     = alltrue([for c in var.alert_notification_channels : can(regex("^projects/[^/]+/notificationChannels/[0-9]+$", c))])
    error_message = "alert_notification_channels must be IDs of the form projects/PROJECT/notificationChannels/NUMBER."
  }
}
