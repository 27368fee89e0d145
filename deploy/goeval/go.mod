module blismodel/goeval

go 1.19
