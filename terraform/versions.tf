terraform {
  # Nothing here needs more than 1.5; older releases were never tried.
  required_version = ">= 1.5.0"

  required_providers {
    google = {
      source = "hashicorp/google"
      # 6.x and 7.x both carry everything used here (build_config.service_account,
      # default_labels, Cloud Run v2 IAM); 8.x changes none of it either.
      version = ">= 6.0.0, < 9.0.0"
    }
    archive = {
      source = "hashicorp/archive"
      # 2.4 made `excludes` glob patterns (doublestar), which the source archive relies on.
      version = ">= 2.4.0, < 3.0.0"
    }
  }
}

provider "google" {
  project        = var.project_id
  region         = var.region
  default_labels = var.labels
}
