# Least privilege, in one place. Project-level grants are limited to what has no
# narrower scope: receiving Eventarc events, calling Vertex AI, and letting the
# Cloud Storage service agent publish its notifications. Object access is granted
# bucket by bucket, through a custom role that can read, list and update metadata
# and nothing more (no create, no delete, no bucket or IAM changes).
#
# Everything here calls IAM or Resource Manager, so it waits for those APIs
# (google_project_service.core): in a fresh project they are not on yet.

data "google_project" "this" {
  project_id = var.project_id

  depends_on = [google_project_service.core]
}

# ---------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------

resource "google_service_account" "runtime" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-runtime"
  display_name = "Captioner runtime"
  description  = "Runs both captioner functions: reads images and writes caption metadata in the allowed buckets, calls Gemini."

  depends_on = [google_project_service.core]
}

resource "google_service_account" "trigger" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-trigger"
  display_name = "Captioner Eventarc trigger"
  description  = "Identity Eventarc uses to deliver storage events to the caption_on_upload function."

  depends_on = [google_project_service.core]
}

# ---------------------------------------------------------------------------
# Runtime: objects of the allowed buckets only
# ---------------------------------------------------------------------------

resource "google_project_iam_custom_role" "object_captioner" {
  project     = var.project_id
  role_id     = "${replace(var.name_prefix, "-", "_")}_objectCaptioner"
  title       = "Captioner object access"
  description = "Read objects, list them, and update their metadata. Granted on buckets, never on the project."
  permissions = [
    "storage.objects.get",
    "storage.objects.list",
    "storage.objects.update",
  ]

  depends_on = [google_project_service.core]
}

# Only on buckets of project_id: a project's custom role can't be granted elsewhere.
# The data sources in main.tf check that each bucket is in project_id before this runs.
resource "google_storage_bucket_iam_member" "runtime_objects" {
  for_each = local.runtime_buckets

  bucket = each.value
  role   = google_project_iam_custom_role.object_captioner.id
  member = google_service_account.runtime.member

  depends_on = [
    google_storage_bucket.watched,
    data.google_storage_bucket.existing,
    data.google_storage_bucket.allowed,
  ]
}

# ---------------------------------------------------------------------------
# Runtime: Gemini
# ---------------------------------------------------------------------------

# roles/aiplatform.user carries hundreds of permissions (datasets, endpoints, tuning,
# notebooks, ...). Calling Gemini needs one: Vertex AI's generative AI access-control
# page lists aiplatform.endpoints.predict for "Make prompt requests" (generateContent
# on publishers/google/models/*), https://cloud.google.com/vertex-ai/generative-ai/docs/access-control.
# Batch prediction jobs take aiplatform.batchPredictionJobs.create on the location,
# .get / .list to follow them and .cancel to stop one (`captioner batch cancel`),
# https://cloud.google.com/vertex-ai/docs/general/iam-permissions
# (the Vertex AI service agent, not this account, reads the inputs). Publisher models
# have no IAM policy of their own, so the project is the narrowest place to grant it.
resource "google_project_iam_custom_role" "vertex_caller" {
  count = local.use_vertex ? 1 : 0

  project     = var.project_id
  role_id     = "${replace(var.name_prefix, "-", "_")}_vertexCaller"
  title       = "Captioner Gemini caller"
  description = "Call Gemini models on Vertex AI (online and batch prediction) and nothing else."
  permissions = [
    "aiplatform.batchPredictionJobs.cancel",
    "aiplatform.batchPredictionJobs.create",
    "aiplatform.batchPredictionJobs.get",
    "aiplatform.batchPredictionJobs.list",
    "aiplatform.endpoints.predict",
  ]

  depends_on = [google_project_service.core]
}

resource "google_project_iam_member" "runtime_vertex" {
  count = local.use_vertex ? 1 : 0

  project = var.project_id
  role    = google_project_iam_custom_role.vertex_caller[0].id
  member  = google_service_account.runtime.member
}

# The function's own files: under the batch prefix, `batch submit` writes request files
# and a manifest, `batch apply` rewrites its checkpoints, `batch prune` deletes old runs;
# under the budget prefix, the daily budget's ledger is replaced at each block. Replacing
# an object takes storage.objects.delete as well as .create
# (https://cloud.google.com/storage/docs/access-control/iam-permissions), so both, and
# only under those prefixes: the images themselves stay get/list/update only.
resource "google_project_iam_custom_role" "batch_files" {
  count = local.use_vertex || local.use_budget ? 1 : 0

  project     = var.project_id
  role_id     = "${replace(var.name_prefix, "-", "_")}_batchFiles"
  title       = "Captioner run files"
  description = "Create, replace and delete the files of captioner batch runs and budget ledgers. Granted under those prefixes only."
  permissions = [
    "storage.objects.create",
    "storage.objects.delete",
  ]

  depends_on = [google_project_service.core]
}

resource "google_storage_bucket_iam_member" "runtime_batch_files" {
  for_each = local.use_vertex ? local.runtime_buckets : toset([])

  bucket = each.value
  role   = google_project_iam_custom_role.batch_files[0].id
  member = google_service_account.runtime.member

  condition {
    title       = "captioner batch prefix only"
    description = "The function writes and deletes its batch runs' files under CAPTION_BATCH_PREFIX and nowhere else."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${each.value}/objects/${var.caption_batch_prefix}\")"
  }

  depends_on = [
    google_storage_bucket.watched,
    data.google_storage_bucket.existing,
    data.google_storage_bucket.allowed,
  ]
}

resource "google_storage_bucket_iam_member" "runtime_budget_ledger" {
  for_each = local.use_budget ? local.runtime_buckets : toset([])

  bucket = each.value
  role   = google_project_iam_custom_role.batch_files[0].id
  member = google_service_account.runtime.member

  condition {
    title       = "captioner budget ledger only"
    description = "The function writes the daily budget's ledger under CAPTION_BUDGET_PREFIX and nowhere else."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${each.value}/objects/${var.caption_budget_prefix}\")"
  }

  depends_on = [
    google_storage_bucket.watched,
    data.google_storage_bucket.existing,
    data.google_storage_bucket.allowed,
  ]
}

# ---------------------------------------------------------------------------
# Vertex AI service agent: what `captioner batch` jobs read and write
# ---------------------------------------------------------------------------

# A batch prediction job runs as the Vertex AI service agent,
# service-PROJECT_NUMBER@gcp-sa-aiplatform.iam.gserviceaccount.com: it reads the request
# files and the images from the bucket and writes the answers under the job's output
# prefix (CAPTION_BATCH_PREFIX). Google creates service agents "at some point after you
# activate and use the API", and "if a service agent hasn't been created yet, then you
# can't grant roles to the service agent" (https://cloud.google.com/iam/docs/service-agents,
# https://cloud.google.com/iam/docs/create-service-agents): enabling aiplatform.googleapis.com
# is not enough in a fresh project. Google's sample for creating the project-level
# aiplatform.googleapis.com agents ahead of use is this resource, google-beta only
# (https://cloud.google.com/iam/docs/samples/iam-create-project-level-service-agent).
# Creating an agent that already exists is a no-op, and destroying this resource leaves
# the agent alone. Note: an agent created this way does not get its default project role
# (roles/aiplatform.serviceAgent) automatically (create-service-agents page above); this
# module grants it only the bucket access below.
resource "google_project_service_identity" "vertex_agent" {
  count    = local.use_vertex ? 1 : 0
  provider = google-beta

  project = var.project_id
  service = "aiplatform.googleapis.com"

  depends_on = [google_project_service.enabled]
}

locals {
  # Built from the project number (the agent's documented address) rather than read from
  # the resource: a plain string known once data.google_project is read.
  vertex_agent_member = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-aiplatform.iam.gserviceaccount.com"
}

# Read: the images and the request files, anywhere in the watched bucket.
resource "google_storage_bucket_iam_member" "vertex_agent_read" {
  count = local.use_vertex ? 1 : 0

  bucket = local.watched_bucket
  role   = "roles/storage.objectViewer"
  member = local.vertex_agent_member

  depends_on = [google_project_service.core, google_project_service_identity.vertex_agent]
}

# Write: create objects under the batch prefix only. A job writes new files into an
# output folder of its own and never replaces or deletes one, so objectCreator suffices
# and objectUser (overwrite, delete) is not granted. Cloud Storage objects are named
# projects/_/buckets/BUCKET/objects/OBJECT in IAM Conditions, and a prefix is restricted
# with resource.name.startsWith(...)
# (https://cloud.google.com/iam/docs/conditions-resource-attributes#resource-name,
# https://cloud.google.com/storage/docs/access-control/iam#conditions). IAM Conditions on a
# bucket need uniform bucket-level access, which the created bucket has.
resource "google_storage_bucket_iam_member" "vertex_agent_write_batch" {
  count = local.use_vertex ? 1 : 0

  bucket = local.watched_bucket
  role   = "roles/storage.objectCreator"
  member = local.vertex_agent_member

  condition {
    title       = "captioner batch prefix only"
    description = "Vertex AI batch prediction writes its outputs under CAPTION_BATCH_PREFIX and nowhere else."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${local.watched_bucket}/objects/${var.caption_batch_prefix}\")"
  }

  depends_on = [google_project_service.core, google_project_service_identity.vertex_agent]
}

resource "google_secret_manager_secret_iam_member" "runtime_api_key" {
  count = local.use_api_key ? 1 : 0

  project   = var.project_id
  secret_id = google_secret_manager_secret.gemini_api_key[0].id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.runtime.member
}

# ---------------------------------------------------------------------------
# Event delivery: Cloud Storage -> Pub/Sub -> Eventarc -> caption_on_upload
# ---------------------------------------------------------------------------

data "google_storage_project_service_account" "gcs" {
  project = var.project_id

  depends_on = [google_project_service.core]
}

# Cloud Storage publishes the object notifications Eventarc listens to.
resource "google_project_iam_member" "gcs_pubsub_publisher" {
  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"

  depends_on = [google_project_service.core]
}

# Eventarc requires it of a trigger's service account for Google-sourced events;
# it carries only eventarc.events.receiveEvent.
resource "google_project_iam_member" "trigger_event_receiver" {
  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = google_service_account.trigger.member

  depends_on = [google_project_service.core]
}

# The trigger's identity may invoke the event function's Cloud Run service, and
# nothing else. (A 2nd-gen function is served by Cloud Run, which checks
# run.invoker; roles/cloudfunctions.invoker on the function does not admit calls.)
resource "google_cloud_run_v2_service_iam_member" "trigger_invokes_on_upload" {
  project  = var.project_id
  location = google_cloudfunctions2_function.caption_on_upload.location
  name     = google_cloudfunctions2_function.caption_on_upload.service_config[0].service
  role     = "roles/run.invoker"
  member   = google_service_account.trigger.member
}

# Pub/Sub mints the trigger account's OIDC tokens for the push. Only service agents
# created on or before 2021-04-08 lack this by default; granted on the one account.
resource "google_service_account_iam_member" "pubsub_token_creator" {
  count = var.grant_pubsub_token_creator ? 1 : 0

  service_account_id = google_service_account.trigger.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

# ---------------------------------------------------------------------------
# HTTP callers: named members only, never allUsers / allAuthenticatedUsers
# ---------------------------------------------------------------------------

resource "google_cloud_run_v2_service_iam_member" "http_invokers" {
  for_each = toset(var.http_invokers)

  project  = var.project_id
  location = google_cloudfunctions2_function.caption_http.location
  name     = google_cloudfunctions2_function.caption_http.service_config[0].service
  role     = "roles/run.invoker"
  member   = each.value
}
