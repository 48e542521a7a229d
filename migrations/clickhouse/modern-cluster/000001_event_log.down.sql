DROP TABLE IF EXISTS {{.Table}} ON CLUSTER {{.Cluster}};
DROP TABLE IF EXISTS {{.Local}} ON CLUSTER {{.Cluster}};
