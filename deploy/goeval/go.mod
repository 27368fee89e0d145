module github.com/inference-sim/blis-model/deploy/goeval

go 1.19
