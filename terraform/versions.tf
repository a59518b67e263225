terraform {
  # Nothing here needs more than 1.5; older releases were never tried. (1.9 would allow
  # a variable validation to look at two variables; the CPU/memory pair is checked by
  # a precondition instead, so 1.5 to 1.8 keep working.)
  required_version = ">= 1.5.0"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.x and 7.x both carry everything used here (build_config.service_account,
      # default_labels, Cloud Run v2 IAM); 8.x changes none of it either. The tests check
      # every resource, block, argument and attribute used against the schemas of
      # 6.50.0 and 8.7.0 (tests/terraform/provider_schema.json).
      version = ">= 6.0.0, < 9.0.0"
    }
    # Only for google_project_service_identity (the Vertex AI service agent, iam.tf),
    # which hashicorp/google does not have. Same range and the same two releases
    # checked (6.50.0 and 8.7.0 in tests/terraform/provider_schema.json).
    google-beta = {
      source  = "hashicorp/google-beta"
      version = ">= 6.0.0, < 9.0.0"
    }
    archive = {
      source = "hashicorp/archive"
      # `excludes` are doublestar glob patterns only from 2.5.0 (CHANGELOG 2.5.0, #354:
      # "Add glob pattern matching support to the `excludes` attribute"); 2.4.x compares
      # each pattern to the path literally, so `.venv*`, `.env.*` and `**/__pycache__`
      # would match nothing and a .env file or a virtualenv would be deployed.
      # https://github.com/hashicorp/terraform-provider-archive/blob/main/CHANGELOG.md
      version = ">= 2.5.0, < 3.0.0"
    }
  }
}

provider "google" {
  project        = var.project_id
  region         = var.region
  default_labels = var.labels
}

provider "google-beta" {
  project        = var.project_id
  region         = var.region
  default_labels = var.labels
}
