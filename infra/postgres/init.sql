-- The MLflow tracking server's database, beside Prefect's (POSTGRES_DB); same owner.
CREATE DATABASE mlflow OWNER umo;
